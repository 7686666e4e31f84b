"""data_prep: dataset -> chat JSONL -> chat-templated tokens with answer-only loss masks -> packed sequences.

CLI: `python -m nemotune.data_prep --help` (or `nemotune prep`). Format contract for readers: nemotune.data_prep.formats.
"""


def main(argv=None) -> int:
    """CLI entry point (`nemotune prep` dispatches here); returns the exit code."""
    from nemotune.data_prep.cli import main as cli_main

    return cli_main(argv)
