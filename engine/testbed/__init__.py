"""The test bed, apart from the product: the built-in shapes model's captioned scenes and pixel oracle
(`scenes`), and the script that trained it (`train`, also `python -m nti.testbed`). The engine itself needs none
of this to invert or edit; evaluation uses the oracle to grade edits of the shapes model."""
