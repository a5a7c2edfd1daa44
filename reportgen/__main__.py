"""`python -m reportgen ...`: the same command as `reportgen ...` and `python run.py ...` (reportgen/runs/cli.py)."""
from reportgen.runs.cli import main

if __name__ == "__main__":
    main()
