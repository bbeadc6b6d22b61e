#!/usr/bin/env python3
"""Checks the module structure of the workspace's crates:

1. no import loops: no two modules (files) reach each other through the
   items they use, other than a parent module re-exporting its children;
2. the layers of the main crate call only downwards, as src/lib.rs maps
   them (cli -> fuse -> fs -> volume -> crypto -> device; keys -> crypto; export -> volume, keys).

Prints each violation and exits 1 if there is one. Run by scripts/test.sh.
Usage: scripts/layers.py [--graph]
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Which top-level modules of the main crate each one may use.
LAYERS = {
    "device": set(),
    "crypto": {"device"},
    "volume": {"device", "crypto"},
    "fs": {"device", "crypto", "volume"},
    "fuse": {"fs"},
    "keys": {"device", "crypto", "volume"},
    "export": {"device", "crypto", "volume", "keys"},
    "cli": {"device", "crypto", "volume", "fs", "fuse", "keys", "export"},
}
# Shared by every layer: the error type, the byte reader, constants.
COMMON = {"error", "wire", "lib"}


def modules(src):
    """Maps module path tuples to their files, for one crate's src/."""
    out = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                rel = []
            out[tuple(rel)] = os.path.join(dirpath, f)
    return out


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.split("\n"))


def test_free(text):
    """The text without `#[cfg(test)] [pub(crate)] mod tests { ... }` blocks."""
    m = re.search(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", text)
    if not m:
        return text
    depth, i = 0, m.end() - 1
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[: m.start()] + test_free(text[i + 1 :])
        i += 1
    return text[: m.start()]


def paths_in(text):
    """Every path used: `use` trees expanded, and inline a::b:: paths."""
    found = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        found.extend(expand(m.group(1).replace("\n", " ")))
    body = re.sub(r"\buse\s+[^;]+;", "", text)
    for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", body):
        found.append(m.group(1).split("::"))
    return found


def expand(tree):
    tree = tree.strip()
    if tree.startswith("pub") or tree.startswith("r#"):
        tree = re.sub(r"^pub(\([^)]*\))?\s+", "", tree)
    i = tree.find("{")
    if i < 0:
        return [[p.strip() for p in tree.split(" as ")[0].split("::") if p.strip()]]
    prefix = [p for p in tree[:i].split("::") if p.strip()]
    inner = tree[i + 1 : tree.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        if p.strip():
            for e in expand(p):
                out.append(prefix + e)
    return out


def resolve(mods, here, path, crate_names):
    """The module a path points into (the longest module prefix)."""
    if not path:
        return None
    if path[0] == "crate":
        base, rest = [], path[1:]
    elif path[0] in crate_names:
        return None  # another crate: not this graph
    elif path[0] in ("super", "self"):
        base = list(here)
        rest = path
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    else:
        # A path relative to this module (a child module) or an extern crate.
        base, rest = list(here), path
        if tuple(base + rest[:1]) not in mods:
            return None
    best = None
    for k in range(len(rest) + 1):
        cand = tuple(base + rest[:k])
        if cand in mods:
            best = cand
    return best


def check_crate(src, crate_names, layered):
    mods = modules(src)
    edges = {}
    for mod, f in mods.items():
        text = test_free(strip_comments(open(f).read()))
        for p in paths_in(text):
            target = resolve(mods, mod, p, crate_names)
            if target is None or target == mod:
                continue
            # A parent declaring or re-exporting its own descendants is the
            # module tree itself, not a dependency.
            if target[: len(mod)] == mod:
                continue
            edges.setdefault(mod, set()).add(target)
    problems = []
    # Loops: strongly connected components of more than one module.
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(mods):
        if v not in index:
            strong(v)
    for comp in comps:
        names = sorted("::".join(c) or "crate" for c in comp)
        problems.append(f"{src}: import loop among {', '.join(names)}")
    if layered:
        for a, targets in edges.items():
            for b in targets:
                la, lb = (a[0] if a else "lib"), (b[0] if b else "lib")
                if la == lb or lb in COMMON or la not in LAYERS:
                    continue
                if lb not in LAYERS[la]:
                    problems.append(
                        f"{src}: {'::'.join(a)} uses {'::'.join(b)}: layer {la} may not call {lb}"
                    )
    return edges, problems


def main():
    crates = [
        (os.path.join(ROOT, "src"), {"lsvfs_keyserver", "lsvfs"}, True),
        (os.path.join(ROOT, "keyserver", "src"), {"lsvfs"}, False),
    ]
    problems = []
    for src, names, layered in crates:
        edges, p = check_crate(os.path.normpath(src), names, layered)
        problems += p
        if "--graph" in sys.argv:
            for a in sorted(edges):
                print("::".join(a) or "crate", "->", ", ".join(sorted("::".join(b) for b in edges[a])))
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print("layers: no import loops; every layer calls only the ones below it")


if __name__ == "__main__":
    main()
