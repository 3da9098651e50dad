#!/usr/bin/env python3
"""The module graph of a crate from its `crate::` / `super::` paths, and its cycles.

Usage: python3 scripts/module-cycles.py [vmboot/src] [--edges]

A node is a source file's module (`vstate::vcpu`); an edge A -> B means A's code outside
its `#[cfg(test)]` module names a path into B. Prints every elementary cycle (exit status 1
if there is one), and with --edges the whole graph. Grep-based, so a path spelled through a
`use` alias elsewhere is missed; good enough to keep ARCHITECTURE.md's claim honest.
"""
import os
import re
import sys


def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                continue
            mods["::".join(rel)] = path
    return mods


def non_test_code(text):
    # Everything before the unit-test module; comments dropped.
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    if m:
        text = text[: m.start()]
    return re.sub(r"//[^\n]*", "", text)


def aliases(src):
    """`pub use vstate::{memory, vcpu};` in lib.rs makes `crate::memory` a module path."""
    out = {}
    lib = os.path.join(src, "lib.rs")
    if os.path.exists(lib):
        for m in re.finditer(r"pub use (\w+)::\{([^}]*)\};", open(lib).read()):
            for name in m.group(2).split(","):
                name = name.strip()
                if name and name[0].islower():
                    out[name] = m.group(1) + "::" + name
    return out


def resolve(path, mods, alias):
    parts = path.split("::")
    if parts and parts[0] in alias:
        parts = alias[parts[0]].split("::") + parts[1:]
    for n in range(len(parts), 0, -1):
        cand = "::".join(parts[:n])
        if cand in mods:
            return cand
    return None


def expand(prefix, body):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e] (enough for `use` lists)."""
    out, depth, cur = [], 0, ""
    for ch in body + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            item = cur.strip()
            cur = ""
            if not item:
                continue
            m = re.match(r"([\w:]*?)::\{(.*)\}$", item, re.S)
            if m:
                out += expand(prefix + "::" + m.group(1), m.group(2))
            else:
                out.append(prefix + "::" + item.split(" as ")[0].strip())
        else:
            cur += ch
    return out


def graph(src):
    mods = modules(src)
    alias = aliases(src)
    edges = {m: set() for m in mods}
    for mod, path in mods.items():
        code = non_test_code(open(path).read())
        parent = "::".join(mod.split("::")[:-1])
        is_dir_mod = path.endswith("mod.rs")
        base_super = mod if is_dir_mod else parent
        base_super = "::".join(base_super.split("::")[:-1]) if is_dir_mod else parent
        paths = []
        for m in re.finditer(r"\b(crate|super)::\{([^;]*?)\};", code, re.S):
            paths += expand(m.group(1), m.group(2))
        paths += [m.group(0) for m in re.finditer(r"\b(crate|super)(::\w+)+", code)]
        for p in paths:
            head, _, rest = p.partition("::")
            if head == "super":
                rest = (base_super + "::" + rest) if base_super else rest
            target = resolve(rest, mods, alias)
            if target and target != mod and not mod.startswith(target + "::"):
                edges[mod].add(target)
    return edges


def cycles(edges):
    """Elementary cycles, each reported once from its smallest node."""
    found = []
    nodes = sorted(edges)
    for start in nodes:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges[node]):
                if nxt == start:
                    found.append(path + [start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    src = args[0] if args else "vmboot/src"
    edges = graph(src)
    if "--edges" in sys.argv:
        for m in sorted(edges):
            print(f"{m} -> {', '.join(sorted(edges[m])) or '-'}")
    found = cycles(edges)
    for c in found:
        print("cycle: " + " -> ".join(c))
    print(f"{len(found)} cycle(s) in {src}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
