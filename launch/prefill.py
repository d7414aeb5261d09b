"""``pd-prefill``: one prefill rank (see ``pd.launch.worker``)."""

from __future__ import annotations

from pd.launch.worker import run


def main(argv: list[str] | None = None) -> None:
    run("prefill", argv)


if __name__ == "__main__":
    main()
