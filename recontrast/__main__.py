"""`python -m recontrast ...` runs the `recontrast` command; torchrun starts it this way:
`torchrun --nproc_per_node=N -m recontrast train --config ...` (docs/scaling.md)."""
from recontrast.cli import main

if __name__ == "__main__":
    main()
