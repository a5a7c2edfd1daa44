"""Entry point in a checkout: `python run.py ...` is the `reportgen ...` command (reportgen/runs/cli.py).

    python run.py                                   # the offline demo
    python run.py model=resnet50 dataset.root=DIR   # a torchvision model on your folder
    python run.py -m model=resnet18,convnext_tiny   # a sweep: one report per model
    python run.py runtime.shard=0/4 ...             # one slice of the folder; python -m reportgen.merge joins them
    torchrun --nproc_per_node=4 run.py ...          # one slice per rank, rank 0 merges and renders
"""
from reportgen.runs.cli import main

if __name__ == "__main__":
    main()
