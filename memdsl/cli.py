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


def _cmd_compile(args) -> str:
    from .api import module_source
    schedule = {k: v for k, v in {"chunk": args.chunk, "semantics": args.semantics,
                                  "tile": _tile(args.tile)}.items() if v is not None}
    text, _ = module_source(args.file, **schedule)
    if args.triton and "\nSPEC2D = " in text:  # a 2-D module (RULE_SOURCE is one repr line: no false hit)
        text = _with_kernels_2d(text, args, schedule)
    elif args.triton:
        text = _with_kernels(text, args, schedule)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        return f"wrote {args.output} ({len(text.splitlines())} lines)"
    return text


def _tile(text: str | None) -> tuple[int, int] | None:
    """`--tile 16,8`: a 2-D rule's tile (time, variate)."""
    if text is None:
        return None
    try:
        t, v = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--tile {text!r}: expected time,variate like 16,8") from None
    return t, v


def _given(text: str, flag: str) -> dict[str, int]:
    try:
        return {n.strip(): int(x) for n, x in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected sizes like d=64 or d=64,h=256") from None


def _sizes(rule, text: str, flag: str) -> dict[str, int]:
    """Every size of the rule from `d=64[,h=256]` (derived sizes computed)."""
    return {n: int(x) for n, x in rule.impl.sizes(sizes=_given(text, flag)).items()}


def _with_kernels(text: str, args, schedule: dict) -> str:
    """Generate the Triton kernels for each `--triton d=64[,h=..]` size set and embed them."""
    from codegen.module import add_kernels
    from codegen.triton_run import Unsupported, kernel_sources

    from .api import compile as compile_rule
    rule = compile_rule(args.file, **schedule)
    chunk = int(args.chunk or rule.chunk)
    kernels = {}
    for text_sizes in args.triton:
        sizes = _sizes(rule, text_sizes, "--triton")
        try:
            fwd, bwd = kernel_sources(rule, sizes, chunk)
        except Unsupported as why:
            raise ValueError(f"rule {rule.name}: no Triton kernel for sizes {sizes}, chunk {chunk}: {why}") from None
        kernels[(tuple(sorted(sizes.items())), chunk)] = {"fwd": fwd, "bwd": bwd}
    return add_kernels(text, kernels)


def _with_kernels_2d(text: str, args, schedule: dict) -> str:
    """A 2-D module with the generated Triton kernels for each `--triton d=4[,..]` size set, at its tile."""
    from codegen.module_2d import add_kernels_2d, kernel_table_2d

    from .twod import compile_2d
    rule = compile_2d(args.file, **schedule)
    return add_kernels_2d(text, kernel_table_2d(rule, [_given(t, "--triton") for t in args.triton]))


def _cmd_kernel(args) -> str:
    """The generated Triton kernel of a rule (or its tile graph): what runs on a GPU, as text."""
    from codegen.triton_gen import Unsupported, _graph, _Layout, generate_backward, generate_forward
    from codegen.triton_run import program_for

    from .api import compile as compile_rule
    rule = compile_rule(args.file, **({"chunk": args.chunk} if args.chunk else {}))
    chunk = int(args.chunk or rule.chunk)
    sizes = _sizes(rule, args.sizes, "--sizes")
    program = program_for(rule)
    try:
        if args.tiles:
            return str(_graph(program, rule.spec, _Layout(program, rule.spec, sizes), chunk))
        generate = generate_backward if args.backward else generate_forward
        return generate(program, rule.spec, sizes, chunk)
    except Unsupported as why:
        raise ValueError(f"rule {rule.name}: no Triton kernel for sizes {sizes}, chunk {chunk}: {why}") from None


def _cmd_check(args) -> str:
    import torch

    from .api import compile as compile_rule
    from .checking import check_rule
    rule = compile_rule(args.file, chunk=args.chunk)
    dtype = {"fp64": torch.float64, "fp32": torch.float32}[args.dtype]
    lines = [f"{rule.name}: algorithm {rule.algorithm}, chunk {rule.chunk}, {args.dtype}, T={args.T}, D={args.D}"]
    worst = 0.0
    for title, errs in check_rule(rule, chunk=args.chunk, T=args.T, D=args.D, dtype=dtype).items():
        lines.append(f"\n{title}")
        lines.append(f"  {'tensor':<22} {'max abs':>10} {'rel RMS':>10}")
        for name, (mx, rr) in errs.items():
            lines.append(f"  {name:<22} {mx:10.2e} {rr:10.2e}")
            worst = max(worst, rr)
    bound = 1e-10 if args.dtype == "fp64" else 1e-5
    lines.append(f"\nworst relative RMS {worst:.2e} ({'ok' if worst <= bound else 'ABOVE'} bound {bound:.0e})")
    return "\n".join(lines)


def _cmd_bench(args) -> str:
    from .bench_cpu import bench_backends
    return bench_backends(args.file, B=args.B, T=args.T, H=args.H, D=args.D, chunk=args.chunk, repeat=args.repeat)


def _cmd_eval(args) -> str:
    from .eval.runner import run
    return run(args)


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

    p = sub.add_parser("compile", help="write the standalone PyTorch module of a rule (1-D or 2-D)")
    p.add_argument("file")
    p.add_argument("-o", "--output", metavar="OUT.py", help="write here (default: print)")
    p.add_argument("--chunk", type=int, help="override the schedule's chunk size")
    p.add_argument("--semantics", choices=["exact", "anchored"], help="override the schedule's semantics")
    p.add_argument("--tile", metavar="T,V", help="a 2-D rule's tile (time, variate), e.g. 16,8")
    p.add_argument("--triton", action="append", metavar="SIZES",
                   help="also carry the generated Triton kernels (fwd + bwd) for these sizes, e.g. d=64; repeatable")
    p.set_defaults(run=_cmd_compile)

    p = sub.add_parser("kernel", help="print the generated Triton kernel (forward, --backward) or its tile graph")
    p.add_argument("file")
    p.add_argument("--sizes", default="d=64", help="free sizes, e.g. d=64 (default)")
    p.add_argument("--chunk", type=int, help="override the schedule's chunk size")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--backward", action="store_true", help="the generated backward kernel")
    g.add_argument("--tiles", action="store_true", help="the chunk's tile graph (SSA), before printing")
    p.set_defaults(run=_cmd_kernel)

    p = sub.add_parser("check", help="run every backend on random data; print errors per output and gradient")
    p.add_argument("file")
    p.add_argument("--chunk", type=int)
    p.add_argument("--T", type=int, default=19, help="sequence length (default 19)")
    p.add_argument("--D", type=int, default=5, help="head dimension (default 5)")
    p.add_argument("--dtype", choices=["fp64", "fp32"], default="fp64")
    p.set_defaults(run=_cmd_check)

    p = sub.add_parser("bench", help="CPU timings of the backends (forward and forward+backward)")
    p.add_argument("file")
    p.add_argument("--chunk", type=int)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(run=_cmd_bench)

    p = sub.add_parser("eval", help="train a small model around each rule on a task (mqar, niah, lm, chunk); "
                       "write tables and plots")
    from .eval.args import add_arguments
    add_arguments(p)
    p.set_defaults(run=_cmd_eval)

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
    except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError, ValueError) as err:
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
