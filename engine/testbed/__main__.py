"""`python -m nti.testbed --out DIR`: train the shapes model (engine/testbed/train.py)."""
from .train import main

main()
