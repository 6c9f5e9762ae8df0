import sys
from pathlib import Path

# The tiny in-code models of the main test suite.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
