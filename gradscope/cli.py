"""The ``gradscope`` command: ``gradscope compare ...`` (CIFAR-10 comparisons), ``gradscope report ...`` (figures)."""

from __future__ import annotations

import sys

COMMANDS = {"compare": "train several architectures on CIFAR-10 with gradscope attached (see gradscope compare -h)",
            "report": "figures and a self-contained HTML page from saved runs (see gradscope report -h)"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: gradscope COMMAND [options]\n\ncommands:\n" + "\n".join(
            f"  {name:<10} {text}" for name, text in COMMANDS.items())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"gradscope: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if argv else 2
    if argv[0] == "report":
        from . import report

        return report.main(argv[1:])
    from .bench import compare

    return compare.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
