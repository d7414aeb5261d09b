"""``pd-colocated``: one colocated instance (prefill and decode in one engine, no KV transfer)."""

from __future__ import annotations

from pd.launch.worker import run


def main(argv: list[str] | None = None) -> None:
    run("colocated", argv)


if __name__ == "__main__":
    main()
