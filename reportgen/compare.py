"""`python -m reportgen.compare RUN_DIR... --out DIR`: the short command name of reportgen.runs.compare."""
from reportgen.runs.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
