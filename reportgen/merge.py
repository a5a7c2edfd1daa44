"""`python -m reportgen.merge SHARD_DIR... --out DIR`: the short command name of reportgen.runs.merge."""
from reportgen.runs.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
