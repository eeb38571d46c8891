#!/usr/bin/env python3
"""Mutation testing of the CPU ukernels: do the C++ (ctest) and Python (pytest) tests notice a bug?

Not part of the default test command (scripts/test.sh); run it by hand after changing kernels or
tests. Each mutant is one small textual change to one kernel source file, made by one of a fixed
list of operators (below). Every mutant is built and tested in a scratch copy of the repository
(default /tmp/sparse_ext_mutation/src; the repository itself is only read):

  1. the torch-free CMake build (Ninja, Release) of the family's C++ test, then ``ctest -R`` it;
  2. the extension built in place in the copy with the repository's venv python
     (``setup.py -q build_ext --inplace``; ninja rebuilds only the mutated object and relinks),
     then ``pytest -q -x python_tests/test_<family>.py`` (+ ``--extra-tests``) with PYTHONPATH on
     the copy (checked once: ``sparse_ext.__file__`` must be inside the copy).

The mutated file is restored in the copy after each file's mutants and when the run ends (also on
Ctrl-C); the copy's build outputs may still hold the last mutant until the next run, whose baseline
builds come first. A mutant is "caught" by a suite when the suite fails, crashes or times out; a mutant that does not
compile is reported as such and not counted. Before the mutants, the unmutated copy must pass the
same commands (baseline), otherwise the run stops.

Operators (fixed list; candidate sites found with regexes over the code with comments, strings and
preprocessor lines blanked):
  cmp-bound   flip the strictness of a comparison in a for/if/while condition: < <-> <=, > <-> >=
  tail-plus1  ``i < n`` -> ``i + 1 < n`` in a for/if condition (the last element is skipped)
  const-off1  an integer offset ``- 8`` / ``+ 8`` -> ``- 9`` / ``+ 9``
  drop-tail   delete a tail statement: a remainder loop ``for (; ...)`` or an ``if (i < n) ...``
              (without else, not a bare return/continue/break guard)
  drop-store  replace a store (``_mm256_storeu_ps(...)``, maskstore, the _mm512 ones, stream, memcpy,
              or a scalar ``out[i] = ...`` to a non-local array) by ``(void)0``
  fma-swap    swap the 2nd (multiplicand) and 3rd (addend) arguments of ``_mm256/512_fmadd_ps``
  acc-swap    accumulate into the sibling accumulator: ``fmadd(a, b, acc0)`` -> ``fmadd(a, b, acc1)``
  mask-const  change a mask / blend / shuffle constant: clear the lowest set bit of a hex literal,
              or lower the last lane of a ``_mm256/512_setr_epi32`` table by one

Sites are picked deterministically: per file, the operators are visited round-robin (the i-th
selected file starts at operator i * per-file, so a run spreads over all operators) and each
operator's sites in an order shuffled with ``--seed``, until ``--per-file`` mutants are picked. The same sources and options give the same
mutants; ``--list`` prints them (with ids usable with ``--only``) without building anything.

Seeded mutants (``--seeded``): known bugs, applied as exact text replacements, that the tests must
catch; the run fails loudly if their pattern no longer matches the source.

Examples:
  scripts/mutation.py --list                                   # every default mutant, no build
  scripts/mutation.py --files '*-avx2.cpp' --per-file 2 --seeded --json build/mutation.json
  scripts/mutation.py --per-file 0 --seeded                    # only the seeded mutants
  scripts/mutation.py --family moe --ctest-only
  scripts/mutation.py --only csrc/kernels/nm/nm-avx2.cpp:133:tail-plus1

Cost (measured on the 2-core x86 VM): the first run builds the extension from scratch in the copy
(~3 min) and the CMake tree (~20 s); every run then runs the baselines (~3 min for the four
families with --extra-tests test_fuzz.py test_hostile.py test_contract.py, well under 1 min
without them). A mutant takes 10-30 s when caught (one object + link in each build, ctest, pytest
stops at the first failure) and ~25-70 s when it survives (the whole pytest selection runs):
28 AVX2 mutants took 12 min in all. Progress lines are printed when stdout is a terminal
(or with -v, to stderr). Exit status: 0 when the run completed, 1 when a seeded mutant survived
pytest and ctest, 2 on a setup or baseline failure.
"""
import argparse
import fnmatch
import glob
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("spmm", "nm", "conv", "moe")
DEFAULT_GLOBS = ("csrc/kernels/*/*.cpp", "csrc/kernels/*/*avx2*.h")
OPERATORS = ("cmp-bound", "tail-plus1", "const-off1", "drop-tail", "drop-store", "fma-swap",
             "acc-swap", "mask-const")

# Known bugs that the tests must catch. pattern: a regex (MULTILINE) searched from the first match
# of anchor (a plain string); the first match is replaced by repl.
SEEDED = [
    dict(name="spmm-sddmm-tail", file="csrc/kernels/spmm/spmm-avx2.cpp", op="seeded:drop-tail",
         anchor="void sddmm(", pattern=r"^[ \t]*if \(n < ld\) [^\n]*\n", repl="",
         what="SDDMM tail `if (n < ld) ...` deleted: dv loses the last 8 tokens when the padded "
              "token count is 8 past a multiple of 16"),
    dict(name="nm-2of4-gemv-tail", file="csrc/kernels/nm/nm-avx2.cpp", op="seeded:tail-plus1",
         anchor="void gemv_2of4(", pattern=r"for \(; c < kept; \+\+c\)",
         repl="for (; c + 1 < kept; ++c)",
         what="2:4 GEMV tail `c < kept` -> `c + 1 < kept`: the last kept slot of a row is dropped"),
    dict(name="moe-gemm-mask1", file="csrc/kernels/moe/moe-gemm-avx2.cpp", op="seeded:const-off1",
         anchor="inline void panel_tile(", pattern=r"cols\) - 8\b", repl="cols) - 9",
         what="`cols - 8` -> `cols - 9` in the second store mask: the last column of a 9-15-row "
              "partial panel is never stored"),
]

# ------------------------------------------------------------------------------------------------
# Source scanning


def code_mask(text):
    """text with comments, string/char literals and preprocessor lines (with continuations)
    replaced by spaces (newlines kept), so regex offsets on it are offsets into text."""
    out = list(text)
    i, n = 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and c in " \t":
            i += 1
            continue
        if line_start and c == "#":  # preprocessor line, with backslash continuations
            while i < n and text[i] != "\n":
                if text[i] == "\\" and i + 1 < n and text[i + 1] == "\n":
                    out[i] = " "
                    i += 2
                    continue
                out[i] = " "
                i += 1
            continue
        line_start = False
        if c == "\n":
            line_start = True
            i += 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                out[i] = " "
                i += 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if text[k] != "\n":
                    out[k] = " "
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                out[k] = " "
            i = j + 1
        else:
            i += 1
    return "".join(out)


OPEN, CLOSE = "([{", ")]}"


def bracket_depths(m, start, stop=None):
    """(index, depth) for each character of m[start:stop], depth being the number of brackets (of
    any kind) open from ``start`` up to and including that character."""
    depth = 0
    for k in range(start, len(m) if stop is None else stop):
        if m[k] in OPEN:
            depth += 1
        elif m[k] in CLOSE:
            depth -= 1
        yield k, depth


def match_close(m, i):
    """Index of the bracket closing the one at m[i] (same kind, nesting of all kinds counted)."""
    for k, depth in bracket_depths(m, i):
        if depth == 0 and m[k] in CLOSE:
            return k
    return -1


def split_args(m, open_i):
    """[(start, end)] of the top-level comma-separated arguments of the call opened at m[open_i]."""
    close = match_close(m, open_i)
    if close < 0:
        return []
    args, start = [], open_i + 1
    for k, depth in bracket_depths(m, open_i + 1, close):
        if m[k] == "," and depth == 0:
            args.append((start, k))
            start = k + 1
    args.append((start, close))
    return args


def strip_span(text, s, e):
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def skip_ws(m, i):
    while i < len(m) and m[i].isspace():
        i += 1
    return i


def statement_end(m, i):
    """End (exclusive) of the statement starting at m[i], or -1 if not understood."""
    i = skip_ws(m, i)
    if i >= len(m):
        return -1
    if m[i] == "{":
        k = match_close(m, i)
        return -1 if k < 0 else k + 1
    kw = re.match(r"(for|if|while)\s*\(", m[i:])
    if kw:
        close = match_close(m, i + kw.end() - 1)
        if close < 0:
            return -1
        end = statement_end(m, close + 1)
        if end < 0:
            return -1
        if kw.group(1) == "if":
            e = re.match(r"\s*else\b", m[end:])
            if e:
                return statement_end(m, end + e.end())
        return end
    for k, depth in bracket_depths(m, i):
        if depth < 0:
            return -1
        if m[k] == ";" and depth == 0:
            return k + 1
    return -1


def conditions(m):
    """(start, end) spans of the conditions of for (second clause), if and while statements."""
    spans = []
    for kw in re.finditer(r"\b(for|if|while)\s*\(", m):
        open_i = kw.end() - 1
        close = match_close(m, open_i)
        if close < 0:
            continue
        if kw.group(1) == "for":
            parts = [p for p in range(open_i + 1, close) if m[p] == ";"]
            if len(parts) != 2:
                continue  # range-for
            spans.append((parts[0] + 1, parts[1], kw))
        else:
            spans.append((open_i + 1, close, kw))
    return spans


class Site:
    def __init__(self, op, start, end, repl):
        self.op, self.start, self.end, self.repl = op, start, end, repl


def find_sites(text):
    """Every candidate site of every operator in one source text."""
    m = code_mask(text)
    sites = []
    conds = conditions(m)

    # cmp-bound and tail-plus1: comparisons written with spaces around them (template angle
    # brackets and shifts never are).
    flips = {"<": "<=", "<=": "<", ">": ">=", ">=": ">"}
    for s, e, kw in conds:
        for c in re.finditer(r"(?<=\s)(<=|>=|<|>)(?=\s)", m[s:e]):
            a, b = s + c.start(), s + c.end()
            sites.append(Site("cmp-bound", a, b, flips[c.group(1)]))
        for c in re.finditer(r"(?:^|(?<=[(;&|]))(\s*)([A-Za-z_]\w*)(\s+<\s)", m[s:e]):
            a = s + c.start(2)
            b = s + c.end(2)
            sites.append(Site("tail-plus1", a, b, text[a:b] + " + 1"))

    # const-off1: integer offsets in arithmetic ("x - 8", "j + 1"), not floats, not in lane tables.
    setr = [(x.end() - 1, match_close(m, x.end() - 1))
            for x in re.finditer(r"_mm(?:256|512)_setr?_epi32\s*\(", m)]
    for c in re.finditer(r"(?<=[\w)\]] )([+-]) (\d+)\b(?![.\w])(?!\s*[*/%])", m):
        if any(a < c.start() < b for a, b in setr):
            continue
        a, b = c.start(2), c.end(2)
        sites.append(Site("const-off1", a, b, str(int(c.group(2)) + 1)))

    # drop-tail: remainder loops "for (; ...)" and "if (cmp) stmt" without else.
    for s, e, kw in conds:
        start = kw.start()
        if kw.group(1) == "while":
            continue
        if kw.group(1) == "for" and not re.match(r"for\s*\(\s*;", m[start:]):
            continue
        if kw.group(1) == "if":
            if re.search(r"\bconstexpr\b", m[start:s]):
                continue
            if not re.search(r"(?<=\s)(<=|>=|<|>)(?=\s)", m[s:e]):
                continue  # tails are guarded by an ordering test; ==/!= ones are fast paths
        end = statement_end(m, start)
        if end < 0:
            continue
        body = m[e + 1:end].strip()
        if kw.group(1) == "if":
            if re.search(r"\belse\b", m[e + 1:end]):
                continue
            if re.fullmatch(r"(return\b[^;]*|continue|break);", body):
                continue
        # "#pragma GCC unroll" right before a loop goes with it.
        line_start = text.rfind("\n", 0, start) + 1
        prev_start = text.rfind("\n", 0, max(line_start - 1, 0)) + 1
        if text[prev_start:line_start].strip().startswith("#pragma"):
            start = prev_start + (len(text[prev_start:line_start]) -
                                  len(text[prev_start:line_start].lstrip()))
        sites.append(Site("drop-tail", start, end, ";"))

    # drop-store: intrinsic stores, memcpy to memory, scalar stores to non-local arrays.
    for c in re.finditer(r"\b(_mm(?:256|512)_(?:mask_?)?store\w*|_mm(?:256|512)_stream_ps|"
                         r"_mm_store\w*|std::memcpy)\s*\(", m):
        close = match_close(m, c.end() - 1)
        if close < 0:
            continue
        if c.group(1) == "std::memcpy" and m[skip_ws(m, c.end())] == "&":
            continue  # memcpy into a local (a load)
        sites.append(Site("drop-store", c.start(), close + 1, "(void)0"))
    local_arrays = set()
    for d in re.finditer(r"\b(?:__m(?:256|512)i?|float|double|int\w*|uint\w*|bool)\s*\**\s+"
                         r"(\w+\s*\[[^\]]*\](?:\s*,\s*\**\s*\w+\s*\[[^\]]*\])*)", m):
        local_arrays |= set(re.findall(r"(\w+)\s*\[[^\]]*\]", d.group(1)))
    local_arrays |= set(re.findall(r"\b__m(?:256|512)i?\s*\*\s*(\w+)", m))  # accumulator tiles
    for c in re.finditer(r"(?<=[;{})])(\s*)([A-Za-z_]\w*)\s*\[", m):
        name = c.group(2)
        if name in local_arrays or name in ("for", "if", "return"):
            continue
        a = c.start(2)
        close = match_close(m, c.end() - 1)
        if close < 0 or not re.match(r"\s*\+?=(?!=)", m[close + 1:]):
            continue
        end = statement_end(m, a)
        if end < 0:
            continue
        sites.append(Site("drop-store", a, end - 1, "(void)0"))

    # fma-swap and acc-swap.
    idents = set(re.findall(r"\b[A-Za-z_]\w*\b", m))
    for c in re.finditer(r"\b_mm(?:256|512)_fmadd_ps\s*\(", m):
        args = split_args(m, c.end() - 1)
        if len(args) != 3:
            continue
        (b1, e1), (b2, e2) = strip_span(text, *args[1]), strip_span(text, *args[2])
        mul, add = text[b1:e1], text[b2:e2]
        if mul != add:
            sites.append(Site("fma-swap", b1, e2, add + text[e1:b2] + mul))
        acc = re.fullmatch(r"([A-Za-z_]\w*?)([01])(\[[^\]]*\])?", add)
        if acc:
            sibling = acc.group(1) + ("1" if acc.group(2) == "0" else "0")
            if sibling in idents:
                sites.append(Site("acc-swap", b2, e2, sibling + (acc.group(3) or "")))

    # mask-const: hex literals (blend/shuffle/permute immediates, bit masks) and lane tables.
    for c in re.finditer(r"\b0[xX]([0-9A-Fa-f]+)([uU]?)\b", m):
        v = int(c.group(1), 16)
        if v == 0:
            continue
        new = v & (v - 1)
        width = len(c.group(1))
        sites.append(Site("mask-const", c.start(), c.end(),
                          "0x%0*X%s" % (width, new, c.group(2))))
    for c in re.finditer(r"\b_mm(256|512)_setr_epi32\s*\(", m):
        args = split_args(m, c.end() - 1)
        if len(args) != (8 if c.group(1) == "256" else 16):
            continue
        b, e = strip_span(text, *args[-1])
        lit = re.match(r"\d+", text[b:e])
        if lit:
            v = int(lit.group(0))
            new = str(v - 1 if v > 0 else v + 1)
            sites.append(Site("mask-const", b, b + lit.end(), new))
    sites.sort(key=lambda x: (x.start, x.op))
    return sites


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def family_of(rel):
    parts = rel.split("/")
    if len(parts) >= 3 and parts[0] == "csrc" and parts[1] == "kernels" and parts[2] in FAMILIES:
        return parts[2]
    return "all"


def describe(text, start, end, repl):
    """'old -> new' on the changed line(s), whitespace condensed."""
    ls = text.rfind("\n", 0, start) + 1
    le = text.find("\n", end - 1 if end > start and text[end - 1] == "\n" else end)
    le = len(text) if le < 0 else le
    old = " ".join(text[ls:le].split())
    new = " ".join((text[ls:start] + repl + text[end:le]).split())
    return old, new


class Mutant:
    def __init__(self, mid, rel, line, op, start, end, repl, old, new, what=None):
        self.id, self.rel, self.line, self.op = mid, rel, line, op
        self.start, self.end, self.repl = start, end, repl
        self.old, self.new, self.what = old, new, what
        self.family = family_of(rel)
        self.result = {}

    def apply(self, text):
        return text[:self.start] + self.repl + text[self.end:]

    def as_dict(self):
        d = dict(id=self.id, file=self.rel, line=self.line, operator=self.op, family=self.family,
                 before=self.old, after=self.new)
        if self.what:
            d["what"] = self.what
        d.update(self.result)
        return d


def sampled_mutants(root, files, per_file, seed, ops):
    out = []
    for file_index, rel in enumerate(files):
        with open(os.path.join(root, rel)) as f:
            text = f.read()
        by_op = {op: [] for op in OPERATORS}
        for s in find_sites(text):
            by_op[s.op].append(s)
        all_ids, seen = {}, {}
        for s in sorted((s for v in by_op.values() for s in v), key=lambda x: (x.start, x.op)):
            key = "%s:%d:%s" % (rel, line_of(text, s.start), s.op)
            seen[key] = seen.get(key, 0) + 1
            all_ids[id(s)] = key if seen[key] == 1 else "%s#%d" % (key, seen[key])
        order = [op for op in OPERATORS if op in ops]
        if not order:
            continue
        rot = (zlib.crc32(str(seed).encode()) + file_index * max(per_file, 0)) % len(order)
        order = order[rot:] + order[:rot]
        queues = {}
        for op in order:
            q = list(by_op[op])
            random.Random("%s|%s|%s" % (seed, rel, op)).shuffle(q)
            queues[op] = q
        picked = []
        limit = per_file if per_file >= 0 else sum(len(q) for q in queues.values())
        while len(picked) < limit and any(queues.values()):
            for op in order:
                if queues[op] and len(picked) < limit:
                    picked.append(queues[op].pop(0))
        for s in sorted(picked, key=lambda x: x.start):
            old, new = describe(text, s.start, s.end, s.repl)
            out.append(Mutant(all_ids[id(s)], rel, line_of(text, s.start), s.op, s.start, s.end,
                              s.repl, old, new))
    return out


def all_mutant_index(root, files):
    """Every site of every file, keyed by id (for --only)."""
    return {m.id: m for m in sampled_mutants(root, files, -1, 0, OPERATORS)}


def seeded_mutants(root):
    out = []
    for sd in SEEDED:
        path = os.path.join(root, sd["file"])
        with open(path) as f:
            text = f.read()
        a = text.find(sd["anchor"])
        if a < 0:
            raise SystemExit("seeded mutant %s: anchor %r not found in %s; adapt SEEDED in %s"
                             % (sd["name"], sd["anchor"], sd["file"], __file__))
        mt = re.compile(sd["pattern"], re.M).search(text, a)
        if not mt:
            raise SystemExit("seeded mutant %s: pattern %r not found after %r in %s; adapt SEEDED"
                             % (sd["name"], sd["pattern"], sd["anchor"], sd["file"]))
        old, new = describe(text, mt.start(), mt.end(), sd["repl"])
        if sd["repl"] == "":
            new = "(line deleted)"
        out.append(Mutant("seeded:" + sd["name"], sd["file"], line_of(text, mt.start()), sd["op"],
                          mt.start(), mt.end(), sd["repl"], old, new, what=sd["what"]))
    return out


def kernel_files(root, patterns, families):
    explicit = bool(patterns)
    found = set()
    for g in DEFAULT_GLOBS:
        found.update(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, g)))
    if explicit:
        # --files: a glob on the repository-relative path or on the file name.
        found = {r for r in found
                 if any(fnmatch.fnmatch(r, p) or fnmatch.fnmatch(os.path.basename(r), p)
                        for p in patterns)}
    elif platform.machine() not in ("aarch64", "arm64"):
        found = {r for r in found if "-neon" not in r}  # not compiled on x86: cannot be caught
    if families:
        found = {r for r in found if family_of(r) in families}
    return sorted(found)


# ------------------------------------------------------------------------------------------------
# Running


class Runner:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        self.src = os.path.join(self.work, "src")
        self.cmake_dir = os.path.join(self.src, "build", "mut-cmake")
        self.logs = os.path.join(self.work, "logs")
        self.python = args.python
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = self.src + (os.pathsep + self.env["PYTHONPATH"]
                                             if self.env.get("PYTHONPATH") else "")
        self.env["MAX_JOBS"] = str(args.jobs)
        self.env["SPARSE_EXT_FORCE_CPU"] = "1"  # the CPU kernels are what is mutated
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.progress_on = sys.stdout.isatty() or args.verbose
        self.t0 = time.time()

    def progress(self, msg):
        if self.progress_on:
            stream = sys.stdout if sys.stdout.isatty() else sys.stderr
            print("[%5.0fs] %s" % (time.time() - self.t0, msg), file=stream, flush=True)

    def sh(self, cmd, timeout, log, cwd=None):
        """(rc, output, seconds); rc None on timeout (the whole process group is killed)."""
        t = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd or self.src, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            rc = None
        out = out.decode(errors="replace")
        if log:
            os.makedirs(self.logs, exist_ok=True)
            with open(os.path.join(self.logs, log), "w") as f:
                f.write("$ %s\n%s\n[rc=%s]\n" % (" ".join(cmd), out, rc))
        return rc, out, time.time() - t

    # -- scratch copy
    def sync(self):
        """Copy the repository's files (tracked + untracked not ignored, as they are now) into the
        copy; unchanged files keep their mtimes so the builds stay incremental."""
        listed = subprocess.run(["git", "-C", self.args.repo, "ls-files", "-z", "-co",
                                 "--exclude-standard"], check=True, capture_output=True).stdout
        files = sorted(set(p for p in listed.decode().split("\0") if p))
        manifest = os.path.join(self.work, "manifest.txt")
        old = set()
        if os.path.exists(manifest):
            with open(manifest) as f:
                old = set(f.read().split("\n")) - {""}
        copied = 0
        for rel in files:
            s, d = os.path.join(self.args.repo, rel), os.path.join(self.src, rel)
            if not os.path.isfile(s) or os.path.islink(s):
                continue
            with open(s, "rb") as f:
                data = f.read()
            if os.path.exists(d):
                with open(d, "rb") as f:
                    if f.read() == data:
                        continue
            os.makedirs(os.path.dirname(d), exist_ok=True)
            with open(d, "wb") as f:
                f.write(data)
            shutil.copymode(s, d)
            copied += 1
        for rel in old - set(files):
            p = os.path.join(self.src, rel)
            if os.path.isfile(p):
                os.remove(p)
        with open(manifest, "w") as f:
            f.write("\n".join(files) + "\n")
        return copied

    def build_cmake(self, families, log):
        if not os.path.exists(os.path.join(self.cmake_dir, "CMakeCache.txt")):
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            rc, out, _ = self.sh(["cmake", "-S", self.src, "-B", self.cmake_dir,
                                  "-DCMAKE_BUILD_TYPE=Release"] + gen,
                                 self.args.build_timeout, "cmake-configure.log")
            if rc != 0:
                raise SystemExit("cmake configure failed in the copy:\n" + out[-3000:])
        targets = [] if "all" in families else ["--target"] + ["test_" + f for f in families]
        return self.sh(["cmake", "--build", self.cmake_dir, "-j", str(self.args.jobs)] + targets,
                       self.args.build_timeout, log)

    def build_ext(self, log):
        return self.sh([self.python, "setup.py", "-q", "build_ext", "--inplace"],
                       self.args.build_timeout, log)

    def ctest(self, family, timeout, log):
        cmd = ["ctest", "--test-dir", self.cmake_dir, "--output-on-failure", "--timeout",
               str(int(timeout))]
        if family != "all":
            cmd += ["-R", "^test_%s$" % family]
        return self.sh(cmd, timeout + 30, log)

    def pytest_files(self, family):
        fams = FAMILIES if family == "all" else (family,)
        files = ["python_tests/test_%s.py" % f for f in fams]
        for extra in self.args.extra_tests:
            files.append(extra if "/" in extra else "python_tests/" + extra)
        return files

    def pytest(self, family, timeout, log):
        cmd = [self.python, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider"]
        return self.sh(cmd + self.pytest_files(family), timeout, log)

    def import_check(self):
        code = ("import sparse_ext, sparse_ext._C as C; print(sparse_ext.__file__); "
                "print(C.__file__); print(sparse_ext.get_isa()); print(sparse_ext.supported_isas())")
        rc, out, _ = self.sh([self.python, "-c", code], 300, "import-check.log")
        lines = out.strip().splitlines()
        if rc != 0 or len(lines) < 4:
            raise SystemExit("importing sparse_ext from the copy failed:\n" + out[-3000:])
        for p in lines[-4:-2]:
            if not os.path.abspath(p).startswith(self.src + os.sep):
                raise SystemExit("sparse_ext imported from %s, not from the copy %s" % (p, self.src))
        print("sparse_ext imported from %s (active ISA %s)" % (lines[-4], lines[-2]))
        return dict(module=lines[-4], extension=lines[-3], active_isa=lines[-2],
                    supported_isas=lines[-1])


def first_failure(out):
    for line in out.splitlines():
        mt = re.match(r"(FAILED|ERROR) (\S+)", line)
        if mt:
            name = mt.group(2)
            return name[len("python_tests/"):] if name.startswith("python_tests/") else name
    return None


def pytest_verdict(rc, out):
    """(caught, detail)."""
    if rc is None:
        return True, "timeout"
    if rc == 0:
        return False, ""
    if rc < 0:
        return True, "crash (%s)" % signal.Signals(-rc).name
    if rc == 5:
        return False, "no tests ran"
    name = first_failure(out)
    if name:
        return True, name
    tail = [l for l in out.strip().splitlines() if l.strip()][-1:] or ["?"]
    return True, "rc=%d: %s" % (rc, tail[0][:60])


def ctest_verdict(rc, out):
    if rc is None:
        return True, "timeout"
    if rc == 0:
        return False, ""
    mt = re.search(r"\(([^)]*(?:SEGFAULT|Subprocess aborted|Exception|Timeout)[^)]*)\)", out)
    return True, mt.group(1) if mt else "failed"


def machine_info():
    model = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        mt = re.search(r"^Model name:\s*(.+)$", out, re.M)
        model = mt.group(1).strip() if mt else model
    except OSError:
        pass
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            mt = re.search(r"^flags\s*:\s*(.*)$", f.read(), re.M)
            flags = set(mt.group(1).split()) if mt else set()
    except OSError:
        pass
    tier = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else
            platform.machine())
    return dict(cpu=model, isa_tier=tier, cores=os.cpu_count(), machine=platform.machine())


def source_info(repo):
    def git(*a):
        r = subprocess.run(["git", "-C", repo] + list(a), capture_output=True, text=True)
        return r.stdout.strip()
    return dict(repo=repo, commit=git("rev-parse", "HEAD"),
                dirty_files=[l[3:] for l in git("status", "--porcelain").splitlines()])


# ------------------------------------------------------------------------------------------------
# Output

def yes(caught):
    return "yes" if caught else "no"


def table(mutants, width=120):
    rows = []
    hdr = "%-3s %-28s %-12s %-6s %s" % ("#", "file:line", "operator", "ctest", "pytest")
    rows.append(hdr)
    rows.append("-" * min(width, 118))
    for i, m in enumerate(mutants, 1):
        r = m.result
        where = "%s:%d" % (os.path.basename(m.rel), m.line)
        op = m.op.replace("seeded:", "S:")
        if r.get("status") == "did not compile":
            c, p = "-", "did not compile"
        elif r.get("status") == "not run":
            c, p = "-", "not run"
        else:
            c = yes(r.get("ctest_caught")) if "ctest_caught" in r else "-"
            if "pytest_caught" in r:
                p = yes(r["pytest_caught"])
                if r.get("pytest_detail"):
                    p += "  " + r["pytest_detail"]
            else:
                p = "-"
        line = "%-3d %-28s %-12s %-6s %s" % (i, where[:28], op[:12], c, p)
        rows.append(line[:width])
    return "\n".join(rows)


def summary(mutants, ctest_only):
    ran = [m for m in mutants if m.result.get("status") == "ran"]
    s = dict(mutants=len(mutants), compiled=len(ran),
             did_not_compile=sum(1 for m in mutants if m.result.get("status") == "did not compile"),
             caught_by_ctest=sum(1 for m in ran if m.result.get("ctest_caught")))
    if not ctest_only:
        s["caught_by_pytest"] = sum(1 for m in ran if m.result.get("pytest_caught"))
        s["caught_by_either"] = sum(1 for m in ran if m.result.get("ctest_caught")
                                    or m.result.get("pytest_caught"))
        s["survived_both"] = s["compiled"] - s["caught_by_either"]
    else:
        s["survived_ctest"] = s["compiled"] - s["caught_by_ctest"]
    return s


def summary_text(s):
    n = s["compiled"]
    pct = lambda k: "%d/%d (%.0f%%)" % (s[k], n, 100.0 * s[k] / n) if n else "0/0"
    parts = ["%d mutants, %d compiled, %d did not compile" % (s["mutants"], n,
                                                               s["did_not_compile"]),
             "caught by ctest %s" % pct("caught_by_ctest")]
    if "caught_by_pytest" in s:
        parts += ["by pytest %s" % pct("caught_by_pytest"),
                  "by either %s" % pct("caught_by_either"),
                  "survived both %d" % s["survived_both"]]
    else:
        parts.append("survived ctest %d" % s["survived_ctest"])
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (head -60 %s) for details."
                                % os.path.relpath(__file__))
    p.add_argument("--files", action="append", default=[],
                   help="glob on the repo-relative path or file name (repeatable); default: "
                        "csrc/kernels/*/*.cpp and *avx2*.h, without NEON files on x86")
    p.add_argument("--family", action="append", default=[], choices=FAMILIES + ("all",),
                   help="only files of this family (repeatable)")
    p.add_argument("--per-file", type=int, default=3, help="sampled mutants per file (default 3)")
    p.add_argument("--ops", default=",".join(OPERATORS),
                   help="comma-separated operators to sample from (default: all)")
    p.add_argument("--seed", default="0", help="site-selection seed (default 0)")
    p.add_argument("--seeded", action="store_true", help="also run the seeded known-bug mutants")
    p.add_argument("--only", action="append", default=[],
                   help="run only this mutant id (from --list; repeatable; any site, sampled "
                        "or not; seeded:<name> for a seeded one)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--ctest-only", action="store_true", help="skip the extension and pytest")
    p.add_argument("--extra-tests", action="append", default=[],
                   help="more pytest files for every mutant, e.g. test_fuzz.py (repeatable)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--work", default="/tmp/sparse_ext_mutation",
                   help="scratch folder (the copy is WORK/src, logs WORK/logs)")
    p.add_argument("--repo", default=REPO, help="repository to copy (default: this script's)")
    p.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"),
                   help="python with torch, used for setup.py and pytest")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    p.add_argument("--build-timeout", type=int, default=1800, help="seconds per build step")
    p.add_argument("--timeout", type=int, default=900,
                   help="max seconds for one ctest or pytest run of a mutant (also capped at "
                        "max(120, 5 x baseline))")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the unmutated test runs (faster reruns; baseline timings unknown)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="progress lines on stderr even when stdout is not a terminal")
    return p.parse_args(argv)


def select(args):
    files = kernel_files(args.repo, args.files, set(args.family) - {"all"})
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPERATORS]
    if bad:
        raise SystemExit("unknown operator(s) %s; known: %s" % (bad, ", ".join(OPERATORS)))
    if args.only:
        index = all_mutant_index(args.repo, kernel_files(args.repo, [], set()) +
                                 [f for f in files if "-neon" in f])
        index.update({m.id: m for m in seeded_mutants(args.repo)})
        missing = [i for i in args.only if i not in index]
        if missing:
            raise SystemExit("unknown mutant id(s): %s (see --list)" % missing)
        return [index[i] for i in args.only]
    mutants = sampled_mutants(args.repo, files, args.per_file, args.seed, ops)
    if args.seeded:
        mutants += seeded_mutants(args.repo)
    # Grouped by file, so each file is restored (and rebuilt) once.
    order = {rel: i for i, rel in enumerate(dict.fromkeys(m.rel for m in mutants))}
    return sorted(mutants, key=lambda m: (order[m.rel], m.id.startswith("seeded:"), m.line))


def main(argv=None):
    args = parse_args(argv)
    args.repo = os.path.abspath(args.repo)
    mutants = select(args)
    if args.list:
        for m in mutants:
            print("%s\n    %s: %s\n    -> %s" % (m.id, m.op, m.old[:100], m.new[:100]))
        print("%d mutants" % len(mutants))
        return 0
    if not mutants:
        print("no mutants selected")
        return 0
    if not os.path.exists(args.python):
        raise SystemExit("python %s not found (--python)" % args.python)

    run = Runner(args)
    if os.path.commonpath([run.src, args.repo]) == args.repo:
        raise SystemExit("--work must be outside the repository")
    os.makedirs(run.src, exist_ok=True)
    t_start = time.time()
    copied = run.sync()
    run.progress("copy %s: %d files updated" % (run.src, copied))
    families = sorted(set(m.family for m in mutants))

    # Baseline builds and test runs on the unmutated copy.
    run.progress("baseline: cmake build")
    rc, out, dt_cmake = run.build_cmake(families, "baseline-cmake.log")
    if rc != 0:
        print("baseline cmake build failed:\n" + out[-3000:])
        return 2
    info = dict(machine=machine_info(), source=source_info(args.repo))
    if not args.ctest_only:
        run.progress("baseline: extension build")
        rc, out, dt_ext = run.build_ext("baseline-ext.log")
        if rc != 0:
            print("baseline extension build failed:\n" + out[-3000:])
            return 2
        info["import"] = run.import_check()
    baseline = {}
    if not args.no_baseline:
        for fam in families:
            run.progress("baseline: ctest %s" % fam)
            rc, out, dt_c = run.ctest(fam, args.timeout, "baseline-ctest-%s.log" % fam)
            if rc != 0:
                print("baseline ctest (%s) fails on the unmutated copy:\n%s" % (fam, out[-3000:]))
                return 2
            b = dict(ctest_s=round(dt_c, 1))
            if not args.ctest_only:
                run.progress("baseline: pytest %s" % " ".join(run.pytest_files(fam)))
                rc, out, dt_p = run.pytest(fam, max(args.timeout, 1800),
                                           "baseline-pytest-%s.log" % fam)
                if rc != 0:
                    print("baseline pytest (%s) fails on the unmutated copy:\n%s"
                          % (fam, out[-3000:]))
                    return 2
                b["pytest_s"] = round(dt_p, 1)
                b["pytest_summary"] = (out.strip().splitlines() or [""])[-1]
            baseline[fam] = b
    t_setup = time.time() - t_start

    texts = {}
    current = None  # file currently holding a mutant in the copy

    def restore(rel):
        path = os.path.join(run.src, rel)
        with open(path, "w") as f:
            f.write(texts[rel])
        os.utime(path, None)

    try:
        for i, m in enumerate(mutants, 1):
            if m.rel not in texts:
                with open(os.path.join(run.src, m.rel)) as f:
                    texts[m.rel] = f.read()
            if current is not None and current != m.rel:
                restore(current)
            text = texts[m.rel]
            path = os.path.join(run.src, m.rel)
            with open(path, "w") as f:
                f.write(m.apply(text))
            now = time.time_ns()
            os.utime(path, ns=(now, now))
            current = m.rel
            t = time.time()
            tag = m.id.replace("/", "_").replace(":", "_").replace("#", "_")
            run.progress("[%d/%d] %s  %s -> %s" % (i, len(mutants), m.id, m.old[:50], m.new[:50]))
            b = baseline.get(m.family, {})
            rc, out, _ = run.build_cmake([m.family], "%s.cmake.log" % tag)
            if _did_not_compile(m, run, rc, out, "cmake", t):
                continue
            m.result = dict(status="ran")
            _run_suite(m, run, "ctest", b, args.timeout, tag)
            if not args.ctest_only:
                rc, out, _ = run.build_ext("%s.ext.log" % tag)
                if _did_not_compile(m, run, rc, out, "extension", t):
                    continue
                _run_suite(m, run, "pytest", b, args.timeout, tag)
            m.result["seconds"] = round(time.time() - t, 1)
    except KeyboardInterrupt:
        print("interrupted; results so far:")
    finally:
        if current is not None:
            restore(current)
    for m in mutants:
        m.result.setdefault("status", "not run")

    s = summary(mutants, args.ctest_only)
    total = time.time() - t_start
    print(table(mutants))
    print()
    print("Score: " + summary_text(s))
    print("Machine: %s (%s); setup %.0fs, total %.0fs" % (info["machine"]["cpu"],
                                                          info["machine"]["isa_tier"], t_setup,
                                                          total))
    survivors = [m for m in mutants if m.result.get("status") == "ran" and
                 not m.result.get("pytest_caught") and not args.ctest_only]
    if survivors:
        print("\nSurvived pytest:")
        for m in survivors:
            print("  %s:%d %s%s\n      %s\n   -> %s" % (
                m.rel, m.line, m.op, "  (caught by ctest)" if m.result.get("ctest_caught") else "",
                m.old[:110], m.new[:110]))
    ctest_survivors = [m for m in mutants if m.result.get("status") == "ran" and
                       not m.result.get("ctest_caught")]
    if ctest_survivors:
        print("\nSurvived ctest: " + ", ".join("%s:%d %s" % (os.path.basename(m.rel), m.line, m.op)
                                              for m in ctest_survivors))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(command=" ".join([os.path.relpath(__file__, args.repo)] +
                                            (sys.argv[1:] if argv is None else argv)),
                           info=info, baseline=baseline, summary=s,
                           setup_seconds=round(t_setup, 1), total_seconds=round(total, 1),
                           mutants=[m.as_dict() for m in mutants]), f, indent=1)
        print("results: %s" % args.json)
    seeded_missed = [m for m in mutants if m.id.startswith("seeded:") and
                     m.result.get("status") == "ran" and not m.result.get("ctest_caught")
                     and not m.result.get("pytest_caught")]
    return 1 if seeded_missed else 0


def _did_not_compile(m, run, rc, out, where, started):
    """Whether mutant ``m``'s build at ``where`` ("cmake" or "extension") failed, recorded on
    ``m``: the compiler rejected it and no test runs."""
    if rc == 0:
        return False
    m.result = dict(status="did not compile", where=where, error=_first_error(out),
                    seconds=round(time.time() - started, 1))
    run.progress("    did not compile (%s)" % where)
    return True


_VERDICTS = {"ctest": ctest_verdict, "pytest": pytest_verdict}


def _run_suite(m, run, suite, baseline, max_timeout, tag):
    """Runs test ``suite`` ("ctest" or "pytest") on mutant ``m`` and records whether it caught
    it; the timeout is 5x the unmutated run's (at least 120 s, at most ``max_timeout``)."""
    seconds = baseline.get(suite + "_s")
    timeout = min(max_timeout, max(120, 5 * seconds)) if seconds is not None else max_timeout
    rc, out, dt = getattr(run, suite)(m.family, timeout, "%s.%s.log" % (tag, suite))
    caught, detail = _VERDICTS[suite](rc, out)
    m.result.update({suite + "_caught": caught, suite + "_detail": detail,
                     suite + "_s": round(dt, 1)})
    run.progress("    %s: %s %s" % (suite, yes(caught), detail))


def _first_error(out):
    for line in out.splitlines():
        if "error" in line:
            return line.strip()[:200]
    return out.strip()[-200:]


if __name__ == "__main__":
    sys.exit(main())
