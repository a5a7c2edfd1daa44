"""`python -m reportgen.index SWEEP_DIR`: the short command name of reportgen.report.sweep (the sweep page)."""
from reportgen.report.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
