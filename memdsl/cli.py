"""The `memdsl` command line. Bad rule files exit with code 2 and a positioned message, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .driver import load, load_ast
from .errors import MemDSLError
from .passes import PASS_NAMES, PIPELINE


def _cmd_parse(args) -> str:
    from .format import format_rule
    from .printer import dump_ast
    tree, _, _ = load_ast(args.file)
    return format_rule(tree).rstrip() if args.format else dump_ast(tree)


def _cmd_ir(args) -> str:
    from .printer import forward_groups, gradient_groups, print_groups, summary
    p = load(args.file, stop_after=args.after)
    groups = forward_groups(p)
    if args.after and "autodiff" in p.passes_run:
        groups.update(gradient_groups(p))
    text = summary(p) + "\n\n" + print_groups(p, groups)
    if args.dot or args.png:
        from .draw import to_dot, to_png
        if args.dot:
            with open(args.dot, "w") as f:
                f.write(to_dot(p.graph))
            text += f"\n\nwrote {args.dot}"
        if args.png:
            text += "\n\n" + to_png(p.graph, args.png)
    return text


def _cmd_grad(args) -> str:
    from .printer import gradient_groups, print_groups
    p = load(args.file)
    return print_groups(p, gradient_groups(p))


def _cmd_passes(args) -> str:
    width = max(len(n) for n in PASS_NAMES)
    lines = ["parse".ljust(width) + "  text -> AST (grammar/memdsl.lark, LALR)"]
    lines += [f"{p.name.ljust(width)}  {p.doc}" for p in PIPELINE]
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memdsl", description="Compile test-time-memorization rule files.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("parse", help="print the AST of a rule file")
    p.add_argument("file")
    p.add_argument("--format", action="store_true", help="print the canonical source instead of the tree")
    p.set_defaults(run=_cmd_parse)

    p = sub.add_parser("ir", help="print the rule summary and its IR (like a jaxpr)")
    p.add_argument("file")
    p.add_argument("--after", choices=PASS_NAMES, help="stop after this pass")
    p.add_argument("--dot", metavar="OUT.dot", help="also write the graph as Graphviz DOT")
    p.add_argument("--png", metavar="OUT.png", help="also draw the graph (needs matplotlib)")
    p.set_defaults(run=_cmd_ir)

    p = sub.add_parser("grad", help="print the symbolic gradients: d loss / d inputs, and the read's VJP")
    p.add_argument("file")
    p.set_defaults(run=_cmd_grad)

    p = sub.add_parser("passes", help="list the compiler passes in order")
    p.set_defaults(run=_cmd_passes)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        out = args.run(args)
    except MemDSLError as err:
        print(err.render(), file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        print(f"memdsl: error: {err}", file=sys.stderr)
        return 2
    except Exception:  # a bug in memdsl, not in the rule: say so plainly
        if os.environ.get("MEMDSL_DEBUG"):
            traceback.print_exc()
        print("memdsl: internal error (a bug in memdsl, not in your rule). "
              "Run with MEMDSL_DEBUG=1 for details and please report it.", file=sys.stderr)
        return 3
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
