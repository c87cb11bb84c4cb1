"""``python -m spectralkern.bench [--quick] [--ops ...]``."""
import sys

from .runner import main

sys.exit(main())
