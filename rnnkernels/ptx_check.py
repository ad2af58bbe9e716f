"""Checks, in the PTX NVRTC makes of a kernel, the memory ordering of a data exchange
between blocks through global memory (persistent kernels: h_t or dz_t every step).

    from rnnkernels import ptx_check
    report = ptx_check.check_exchange(
        "csrc/lstm_persistent.cu", "rnnkernels::lstm_forward_persistent<4, 2, true>",
        exchanged="h_all", flags="ready")
    assert report.ok, report.explain()

    # every instance of a source in one NVRTC compile:
    reports = ptx_check.check_exchanges(path, names, exchanged="h_all", flags="ready")

    python -m rnnkernels.ptx_check csrc/lstm_persistent.cu 'rnnkernels::k<4, 2>' \
        --exchanged h_all --flags ready          # exit status 1 if a problem is found

needs only the NVRTC library (``pip install rnnkernels[cuda13]``): no GPU, no driver.
The emulator's stale memory model (rnnkernels/emulator/README.md, "Memory ordering")
checks the same contract by running the kernel; this check reads what the compiler
made of it, so it also sees what the emulator cannot: a load the compiler turned into
``ld.global.nc``, a fence it moved, inline PTX.

The contract (a GPU's L1 is not coherent between SMs; stores reach other SMs in order
only through a release):
  * producer: stores to the exchanged buffer, then a RELEASE, then the flag publish:
    ``fence.sc/acq_rel.gpu`` or ``membar.gl`` before the ``atom``/``red``/``st`` on the
    flags, or the publish itself ``.release``/``.acq_rel`` (``st.release.gpu``,
    ``red.release.gpu``, ``atom.acq_rel.gpu``; ``cuda::atomic_ref::store(release)``);
  * consumer: polls the flags with a strong read (an atomic, ``ld.relaxed``,
    ``ld.volatile``, ``ld.acquire``), then an ACQUIRE before it reads the exchanged
    buffer: the poll itself ``ld.acquire``/``atom.acquire``, or a gpu-scope fence after it;
  * every load of the exchanged buffer bypasses L1: ``ld.global.cg`` (``__ldcg``),
    ``ld.global.cv`` (``__ldcv``), or a strong ``.relaxed``/``.acquire``/``.volatile``
    load; never a plain ``ld.global``, ``ld.global.nc`` (``__ldg``, or what the compiler
    makes of a ``const __restrict__`` pointer), ``.ca``, ``.cs`` or ``.lu``.

How the loads and flag operations are found: by data flow, not by names. The
exchanged buffer's and the flags' kernel parameters (by name or index) are followed
from their ``ld.param`` through every instruction that computes with them (``cvta``,
``add``, ``mad``, ``mov``, ...; a loaded value does not carry the taint) to the address
operands of loads, stores and atomics. A register that mixes a tracked pointer with
anything else stays tracked, so the check errs on the side of flagging a load. A
pointer that goes through memory (stored to shared memory and loaded back) is lost:
loads through it are not checked.

Ordering is checked along the PTX text, which NVRTC lays out in source order, plus
the loops' back edges (a backward ``bra``): after the end of a loop body comes its head
again, so a poll at the bottom of a step loop is checked against the loads at its top.
  * release: on every path back from a flag publish that is not itself a release (the
    text before it, then the rest of its loops' bodies), a gpu-scope fence must come
    before any store to the exchanged buffer and before the kernel's start;
  * acquire: on the path forward from each poll that is not itself an acquire, a
    gpu-scope fence must come before any load of the exchanged buffer;
  * the kernel must both poll and publish the flags (a consumer that never waits has
    no poll).
Not checked: that a read of the exchanged buffer comes after a poll at all (the first
step of a loop reads host data before any wait, so the text cannot tell: the
emulator's stale model catches a consumer that does not wait); that the right flag is
awaited; what happens in non-inlined calls (reported as a problem: inline them).
Branches other than loops' back edges are read as falling through, so a fence on only
one side of an if counts: the emulator runs both sides.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ARCH = "sm_90"

_FENCE = re.compile(r"^(membar\.(gl|sys)|fence\.(sc|acq_rel)\.(gpu|sys))$")
_RELEASE_QUALIFIERS = {"release", "acq_rel", "sc"}
_ACQUIRE_QUALIFIERS = {"acquire", "acq_rel", "sc"}
_L1_BYPASSING = {"cg", "cv", "relaxed", "acquire", "volatile"}
_NOT_GLOBAL = {"param", "shared", "local", "const", "tex"}
# atom.<op> with this immediate operand changes nothing: a read (a poll).
_READ_ONLY_ATOMICS = {"add": "0", "or": "0", "xor": "0", "sub": "0", "max": "0", "and": "-1"}


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line in the entry's PTX text
    text: str
    opcode: str  # e.g. "ld.global.cg.v4.f32"
    operands: tuple[str, ...]
    labels: tuple[str, ...] = ()  # labels just before it (branch targets)

    @property
    def parts(self) -> list[str]:
        return self.opcode.split(".")

    def address_register(self) -> str | None:
        """The register of a ``[%rd7+16]`` operand, or None."""
        for operand in self.operands:
            match = re.match(r"^\[\s*(%\w+)", operand)
            if match:
                return match.group(1)
        return None


@dataclass
class ExchangeReport:
    """What :func:`check_exchange` found. ``ok`` when ``problems`` is empty."""

    name_expression: str
    arch: str
    exchanged_params: tuple[int, ...]
    flag_params: tuple[int, ...]
    exchanged_loads: list[Instruction] = field(default_factory=list)
    exchanged_stores: list[Instruction] = field(default_factory=list)
    polls: list[Instruction] = field(default_factory=list)
    publishes: list[Instruction] = field(default_factory=list)
    fences: list[Instruction] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ptx: str = ""  # the entry's PTX

    @property
    def ok(self) -> bool:
        return not self.problems

    def explain(self) -> str:
        head = (f"{self.name_expression} ({self.arch}): {len(self.exchanged_loads)} loads of the "
                f"exchanged buffer, {len(self.polls)} polls, {len(self.publishes)} publishes, "
                f"{len(self.fences)} fences")
        return "\n".join([head, *(f"  problem: {p}" for p in self.problems)])


def check_exchange(
    source: os.PathLike | str,
    name_expression: str,
    *,
    exchanged: str | int | Sequence[str | int],
    flags: str | int | Sequence[str | int],
    include_dirs: Sequence[os.PathLike | str] = (),
    options: Sequence[str] | None = None,
    arch: str = DEFAULT_ARCH,
) -> ExchangeReport:
    """Compiles ``name_expression`` from ``source`` with NVRTC and checks the exchange
    contract (module docstring) in its PTX.

    source: a path, or the source text (a string containing a newline). name_expression:
    as for NVRTC, e.g. ``"rnnkernels::lstm_forward_persistent<4, 2, true>"``.
    exchanged, flags: the kernel parameters (names as in the source's declaration, or
    0-based indices) of the buffer the blocks exchange and of the ready flags / barrier
    words. include_dirs: ``--include-path`` folders (csrc/ is always one). options: NVRTC
    options instead of ``rnnkernels._launch.compile_options()``; CuPy's own additions
    (``nvrtc_check.cupy_nvrtc_options``) and ``-arch=compute_<arch>`` either way. Raises
    RuntimeError with NVRTC's log if the source does not compile (or NVRTC is missing),
    ValueError for a parameter the kernel does not have.
    """
    return check_exchanges(source, [name_expression], exchanged=exchanged, flags=flags,
                           include_dirs=include_dirs, options=options, arch=arch)[0]


def check_exchanges(
    source: os.PathLike | str,
    name_expressions: Sequence[str],
    *,
    exchanged: str | int | Sequence[str | int],
    flags: str | int | Sequence[str | int],
    include_dirs: Sequence[os.PathLike | str] = (),
    options: Sequence[str] | None = None,
    arch: str = DEFAULT_ARCH,
) -> list[ExchangeReport]:
    """:func:`check_exchange` for several instances of one source (e.g. every tile of
    a persistent kernel), compiled together in one NVRTC call; one report per name, in
    order. ``exchanged`` and ``flags`` name the same parameters in each."""
    if isinstance(name_expressions, str) or not name_expressions:
        raise ValueError("name_expressions must be a non-empty sequence of name expressions")
    text, file_name = _read(source)
    plans = []
    for name in name_expressions:
        parameters = kernel_parameters(text, name)
        plans.append((name, _indices(exchanged, parameters, "exchanged", name),
                      _indices(flags, parameters, "flags", name)))
    ptx, lowered = compile_to_ptx(text, file_name, list(name_expressions), include_dirs, options, arch)
    reports = []
    for name, exchanged_params, flag_params in plans:
        entry = entry_ptx(ptx, lowered[name])
        report = ExchangeReport(name, arch, exchanged_params, flag_params, ptx=entry)
        _analyse(parse_instructions(entry), report)
        reports.append(report)
    return reports


# ------------------------------------------------------------------------ compiling
def _read(source) -> tuple[str, str]:
    if isinstance(source, str) and "\n" in source:
        return source, "source.cu"
    path = Path(source)
    return path.read_text(encoding="utf-8"), path.name


def compile_to_ptx(text: str, file_name: str, name_expressions: Sequence[str], include_dirs=(), options=None,
                   arch: str = DEFAULT_ARCH) -> tuple[str, dict[str, str]]:
    """(PTX of the whole program, {name expression: lowered name})."""
    from . import _launch, _sources
    from .nvrtc_check import compile_program, cupy_nvrtc_options

    match = re.fullmatch(r"sm_(\d+)(a?)", arch)
    if not match:
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    base = tuple(_launch.compile_options()) if options is None else tuple(options)
    folders = tuple(f"--include-path={folder}" for folder in (*include_dirs, _sources.csrc_dir()))
    # The options CuPy's RawModule hands NVRTC (read from CuPy, as nvrtc_check does: its
    # libcu++ comes before ours), with -arch=compute_XX: NVRTC's PTX output, which ptxas
    # would turn into the sm_XX cubin.
    compute = f"-arch=compute_{match.group(1)}{match.group(2)}"
    all_options = [compute if option.startswith("-arch=") else option
                   for option in cupy_nvrtc_options((*base, *folders), f"sm_{match.group(1)}")]
    compiled = compile_program(f'#line 1 "{file_name}"\n' + text, file_name, list(name_expressions), all_options,
                               arch, ptx=True)
    return compiled.ptx, compiled.lowered


def entry_ptx(ptx: str, lowered: str) -> str:
    """The ``.entry`` of ``lowered`` in ``ptx``: its header and body."""
    match = re.search(r"\.entry\s+" + re.escape(lowered) + r"\s*\(", ptx)
    if not match:
        raise RuntimeError(f"no .entry {lowered} in the PTX")
    start = ptx.index("{", match.end())
    depth = 0
    for i in range(start, len(ptx)):
        if ptx[i] == "{":
            depth += 1
        elif ptx[i] == "}":
            depth -= 1
            if depth == 0:
                return ptx[match.start() : i + 1]
    raise RuntimeError(f"the body of .entry {lowered} does not end")


# ------------------------------------------------------------------------ parameters
def kernel_parameters(text: str, name_expression: str) -> list[str]:
    """Parameter names of the ``__global__`` function ``name_expression`` names, read
    from its declaration in ``text`` (house style: one parameter per line)."""
    base = re.sub(r"<.*", "", name_expression).split("::")[-1].strip()
    stripped = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.DOTALL)
    for match in re.finditer(r"\b" + re.escape(base) + r"\s*\(", stripped):
        before = stripped[max(0, match.start() - 400) : match.start()]
        if "__global__" not in before or ";" in before[before.rfind("__global__"):]:
            continue
        depth, i = 1, match.end()
        while depth and i < len(stripped):
            depth += {"(": 1, ")": -1}.get(stripped[i], 0)
            i += 1
        return [_parameter_name(p) for p in _split_top_level(stripped[match.end() : i - 1]) if p.strip()]
    raise ValueError(f"no __global__ declaration of {base} found in the source")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "<([":
            depth += 1
        elif char in ">)]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _parameter_name(declaration: str) -> str:
    declaration = declaration.split("=")[0]
    names = re.findall(r"[A-Za-z_]\w*", re.sub(r"\[.*?\]", "", declaration))
    return names[-1] if names else ""


def _indices(wanted, parameters: list[str], what: str, name_expression: str) -> tuple[int, ...]:
    items = [wanted] if isinstance(wanted, (str, int)) else list(wanted)
    if not items:
        raise ValueError(f"{what} must name at least one parameter of {name_expression}")
    indices = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise TypeError(f"{what}: parameters are names or indices, got {item!r}")
        if isinstance(item, int):
            if not 0 <= item < len(parameters):
                raise ValueError(f"{what}: {name_expression} has {len(parameters)} parameters, no index {item}")
            indices.append(item)
        elif item in parameters:
            indices.append(parameters.index(item))
        else:
            raise ValueError(f"{what}: {name_expression} has no parameter {item!r} (it has {', '.join(parameters)})")
    return tuple(indices)


# ------------------------------------------------------------------------ analysis
def parse_instructions(entry: str) -> list[Instruction]:
    """The instructions of an entry's body, one per statement (labels, directives and
    comments left out); ``line`` counts from the ``.entry`` line."""
    body_start = entry.index("{")
    first_line = entry[:body_start].count("\n") + 1
    instructions = []
    labels: list[str] = []
    for number, raw in enumerate(entry[body_start + 1 :].splitlines(), start=first_line):
        line = re.sub(r"//.*", "", raw).strip()
        label = re.match(r"^(\$?[\w$]+):\s*", line)
        if label:
            labels.append(label.group(1))
            line = line[label.end() :]
        if not line or line.startswith((".", "{", "}")):
            continue
        for statement in filter(None, (s.strip() for s in line.split(";"))):
            statement = re.sub(r"^@!?%\w+\s+", "", statement)  # a guard predicate
            opcode, _, rest = statement.partition(" ")
            rest = rest.replace("{", "(").replace("}", ")")  # vector operands stay one operand
            operands = tuple(o.strip() for o in _split_top_level(rest) if o.strip())
            instructions.append(Instruction(number, raw.strip(), opcode, operands, tuple(labels)))
            labels = []
    return instructions


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(head, branch) index pairs of the backward branches: the loops."""
    where = {label: i for i, ins in enumerate(instructions) for label in ins.labels}
    found = []
    for i, ins in enumerate(instructions):
        if ins.parts[0] == "bra" and ins.operands and where.get(ins.operands[-1], i + 1) <= i:
            found.append((where[ins.operands[-1]], i))
    return found


def _forward(i: int, count: int, loop_list) -> list[int]:
    """Instructions that may run after instruction i: the rest of the text, then, when i
    is inside loops, the next iteration from the outermost head up to i."""
    heads = [head for head, branch in loop_list if head <= i <= branch]
    return [*range(i + 1, count), *(range(min(heads), i) if heads else ())]


def _backward(i: int, loop_list) -> list[int]:
    """Instructions that may have run before instruction i, nearest first: the text
    before it, then, when i is inside loops, the previous iteration's rest."""
    ends = [branch for head, branch in loop_list if head <= i <= branch]
    return [*range(i - 1, -1, -1), *(range(max(ends), i, -1) if ends else ())]


def _tainted_registers(instructions: list[Instruction], params: tuple[int, ...]) -> set[str]:
    """Registers that hold (something computed from) the pointer parameters ``params``."""
    suffixes = tuple(f"_param_{i}]" for i in params)
    tainted: set[str] = set()
    changed = True
    while changed:  # to a fixed point: loops carry registers backwards in the text
        changed = False
        for ins in instructions:
            parts = ins.parts
            if not ins.operands or parts[0] in {"st", "red", "bar", "membar", "fence", "bra", "ret", "exit", "call"}:
                continue
            destination, sources = ins.operands[0], ins.operands[1:]
            if parts[0] in {"ld", "ldu"} and "param" in parts:
                hit = any(s.replace(" ", "").endswith(suffixes) for s in sources)
            elif parts[0] in {"ld", "ldu", "atom", "setp"}:
                continue  # a loaded value is data, not the address it came from
            else:
                hit = any(re.sub(r"[\[\]]", "", s) in tainted for s in sources)
            if hit and destination not in tainted:
                tainted.add(destination)
                changed = True
    return tainted


def _is_global_access(ins: Instruction) -> bool:
    return not (_NOT_GLOBAL & set(ins.parts[1:]))


def _is_fence(ins: Instruction) -> bool:
    return bool(_FENCE.match(ins.opcode))


def _is_poll(ins: Instruction) -> bool:
    parts = ins.parts
    if parts[0] in {"ld", "ldu"}:
        return True
    if parts[0] == "atom":
        operation = next((p for p in parts[1:] if p in _READ_ONLY_ATOMICS or p in {"cas", "exch", "inc", "dec", "min"}), None)
        # A compare-and-swap on a flag takes a lock or claims a slot: a read, followed by
        # an acquire. (A CAS that publishes data is not checked for a release.)
        return operation == "cas" or (
            operation in _READ_ONLY_ATOMICS and ins.operands[-1] == _READ_ONLY_ATOMICS[operation]
        )
    return False


def _is_publish(ins: Instruction) -> bool:
    parts = ins.parts
    return parts[0] in {"st", "red"} or (parts[0] == "atom" and not _is_poll(ins))


def _analyse(instructions: list[Instruction], report: ExchangeReport) -> None:
    data = _tainted_registers(instructions, report.exchanged_params)
    flags = _tainted_registers(instructions, report.flag_params)
    kinds = []  # per instruction: "load", "store", "poll", "publish", "fence" or ""
    for ins in instructions:
        parts = ins.parts
        address = ins.address_register()
        kind = ""
        if parts[0] == "call":
            report.problems.append(f"line {ins.line}: a call ({ins.text}): the check cannot see into it; inline it")
        elif _is_fence(ins):
            kind = "fence"
            report.fences.append(ins)
        elif address in flags and _is_global_access(ins) and parts[0] in {"ld", "ldu", "st", "red", "atom"}:
            if _is_poll(ins):
                kind = "poll"
                report.polls.append(ins)
                if parts[0] in {"ld", "ldu"} and not ({"relaxed", "acquire", "volatile"} & set(parts)):
                    report.problems.append(
                        f"line {ins.line}: plain load of a flag ({ins.text}): the compiler may hoist it "
                        "out of the loop and it may hit a stale L1 line; use an atomic or ld.acquire/relaxed"
                    )
            if _is_publish(ins):
                kind = "publish"
                report.publishes.append(ins)
        elif address in data and _is_global_access(ins):
            if parts[0] in {"ld", "ldu"}:
                kind = "load"
                report.exchanged_loads.append(ins)
                if not (_L1_BYPASSING & set(parts)):
                    report.problems.append(
                        f"line {ins.line}: {ins.opcode} of the exchanged buffer ({ins.text}): may read a "
                        "stale L1 line; read it with __ldcg (ld.global.cg) or a strong load"
                    )
            elif parts[0] in {"st", "red", "atom"}:
                kind = "store"
                report.exchanged_stores.append(ins)
        kinds.append(kind)

    if not report.polls:
        report.problems.append("the kernel never reads the flags: consumers do not wait for the producers")
    if not report.publishes:
        report.problems.append("the kernel never writes the flags: producers do not publish")

    loop_list = loops(instructions)

    def first(path, wanted):
        """The first of `path` that is a fence or of kind `wanted`: (kind, index)."""
        for j in path:
            if kinds[j] in ("fence", wanted):
                return kinds[j], j
        return None, None

    for i, ins in enumerate(instructions):
        if kinds[i] == "publish" and not (_RELEASE_QUALIFIERS & set(ins.parts)):
            kind, j = first(_backward(i, loop_list), "store")
            if kind != "fence":
                where = f"the store at line {instructions[j].line}" if kind == "store" else "the kernel's start"
                report.problems.append(
                    f"line {ins.line}: flag publish ({ins.text}) without a release: no gpu-scope fence "
                    f"between it and {where}"
                )
        if kinds[i] == "poll" and not (_ACQUIRE_QUALIFIERS & set(ins.parts)):
            kind, j = first(_forward(i, len(instructions), loop_list), "load")
            if kind == "load":
                report.problems.append(
                    f"line {ins.line}: poll ({ins.text}) without an acquire: the exchanged buffer is read "
                    f"at line {instructions[j].line} with no gpu-scope fence in between"
                )


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rnnkernels.ptx_check",
        description="Check the memory ordering of a block-to-block exchange in a kernel's PTX (NVRTC, no GPU).",
    )
    parser.add_argument("source", help="the .cu file")
    parser.add_argument("names", nargs="+", help="name expressions, e.g. 'rnnkernels::k<4, 2>'")
    parser.add_argument("--exchanged", required=True, nargs="+", help="parameter(s) of the exchanged buffer")
    parser.add_argument("--flags", required=True, nargs="+", help="parameter(s) of the ready flags / barrier words")
    parser.add_argument("--arch", default=DEFAULT_ARCH)
    parser.add_argument("-I", dest="include_dirs", action="append", default=[], help="extra include folder")
    args = parser.parse_args(argv)
    reports = check_exchanges(args.source, args.names, exchanged=args.exchanged, flags=args.flags,
                              include_dirs=args.include_dirs, arch=args.arch)
    for report in reports:
        print(("ok    " if report.ok else "FAIL  ") + report.explain())
    return 0 if all(report.ok for report in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
