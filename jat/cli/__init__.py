"""The command-line programs. Each module's `main(argv)` is a console command declared in
pyproject.toml (`jat-train`, `jat-infer`, `jat-eval`, `jat-precompute`, `jat-bench`, `jat-corpus`,
`jat-overfit`, `jat-demo`, `jat-merge`, `jat-model-info`), and `scripts/<module>.py` runs the same
`main` from a checkout.
"""
