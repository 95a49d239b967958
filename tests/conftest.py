import os
import sys

# The tests import their helpers as a module next to them.
sys.path.insert(0, os.path.dirname(__file__))

import fast_interpreter  # noqa: E402

fast_interpreter.install()
