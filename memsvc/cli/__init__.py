"""The `memsvc` command line (typer): `memsvc.cli.commands.app`, with the model-side commands in
`memsvc.cli.model` (knnlm, generate) and `memsvc.cli.longctx` (eval-long, train-gate). The CLI imports
the library (`memsvc`, `lm`, `retrievers`), never the reverse; heavy imports (torch, transformers, FAISS,
SQL) stay inside the commands, so `memsvc --help` starts fast."""


def main() -> None:
    """The `memsvc` console script."""
    from memsvc.cli.commands import app

    app()
