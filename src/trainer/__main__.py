"""``python -m trainer`` = ``segthenseg-train`` (also what ``torchrun -m trainer`` runs)."""

import sys

from .train import main

sys.exit(main())
