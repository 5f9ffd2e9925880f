#!/usr/bin/env python3
"""check_interface.py - compares docs/interface.md with what the code answers.

Inputs (written by tests/e2e_interface.sh): the output of `curvd routes`, the
body of `GET /v1/ops` and the output of `curvd --help`.  The checked blocks of
the document lie between `<!-- check:NAME -->` and `<!-- /check -->`:

  routes      table rows | `METHOD` | `PATH` | ...   vs `curvd routes`
  curvatures  table rows | `name` | ...             vs /v1/ops "curvatures"
  statuses    table rows | `name` | ...             vs /v1/ops "statuses"
  ops         `#### \`op\`` headings                  vs /v1/ops "ops"; each op's option
              table rows | `option` | ...           vs /v1/ops "op_specs"[op]["options"]
              (and every enum choice and every
              method must appear in the op's section, every result field too)
  cli         table rows | `--flag` | ...           vs the --flags in `curvd --help`

Every check goes both ways (code without docs, docs without code) except the
result fields (code -> docs only).  Exit 0 when all match, 1 with one line per
difference otherwise.

  python3 tests/check_interface.py DOC ROUTES OPS_JSON HELP
  python3 tests/check_interface.py --self-test DOC ROUTES OPS_JSON HELP
    (also proves that an undocumented route, op, option, curvature, flag and a
     route missing from the document are each caught)
"""
import json
import re
import sys

ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(?:\s*`([^`]+)`\s*\|)?")
OP_HEAD = re.compile(r"^#{3,4}\s+`([^`]+)`\s*$")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def blocks(doc):
    """{name: [lines]} of the checked blocks."""
    out, name = {}, None
    for line in doc.splitlines():
        m = re.match(r"^<!--\s*check:([a-z_]+)\s*-->\s*$", line)
        if m:
            name = m.group(1)
            out.setdefault(name, [])
        elif re.match(r"^<!--\s*/check\s*-->\s*$", line):
            name = None
        elif name:
            out[name].append(line)
    return out


def first_cells(lines):
    return [m.group(1) for m in map(ROW.match, lines) if m]


def doc_routes(lines):
    return [m.group(1) + " " + m.group(2) for m in map(ROW.match, lines) if m and m.group(2)]


def doc_ops(lines):
    """{op: (option names in its tables, the section's text)}."""
    ops, cur, text = {}, None, []
    for line in lines + ["#### `"]:
        m = OP_HEAD.match(line)
        if m or line == "#### `":
            if cur is not None:
                ops[cur] = (first_cells(text), "\n".join(text))
            cur, text = (m.group(1) if m else None), []
        else:
            text.append(line)
    return ops


def compare(what, code, doc, errors, one_way=False):
    code, doc = list(code), list(doc)
    for d in sorted({x for x in doc if doc.count(x) > 1} if not one_way else ()):
        errors.append("%s: %s is documented twice" % (what, d))
    for c in code:
        if c not in doc:
            errors.append("%s: %s is in the code but not in docs/interface.md" % (what, c))
    if not one_way:
        for d in sorted(set(doc)):
            if d not in code:
                errors.append("%s: %s is in docs/interface.md but not in the code" % (what, d))


def check(doc, routes_txt, ops, help_txt):
    errors, notes = [], []
    b = blocks(doc)
    for name in ("routes", "curvatures", "statuses", "ops", "cli"):
        if name not in b:
            errors.append("docs/interface.md has no <!-- check:%s --> block" % name)
    routes = [" ".join(l.split()[:2]) for l in routes_txt.splitlines() if l.strip()]
    if not routes:
        errors.append("routes: `curvd routes` printed nothing")
    compare("route", routes, doc_routes(b.get("routes", [])), errors)
    compare("curvature", ops.get("curvatures", []), first_cells(b.get("curvatures", [])), errors)
    if "statuses" not in ops:
        errors.append("GET /v1/ops has no \"statuses\"")
    compare("job status", ops.get("statuses", []), first_cells(b.get("statuses", [])), errors)
    documented = doc_ops(b.get("ops", []))
    compare("op", ops.get("ops", []), list(documented), errors)
    specs = ops.get("op_specs")
    if specs is None:
        errors.append("GET /v1/ops has no \"op_specs\"")
    else:
        compare("op_specs", list(specs), ops.get("ops", []), errors)
        for op, spec in specs.items():
            if op not in documented:
                continue
            opts, text = documented[op]
            names = [o["name"] for o in spec.get("options", [])]
            compare("option of %s" % op, names, opts, errors)
            rows = {m.group(1): l for l in text.splitlines() for m in [ROW.match(l)] if m}
            for o in spec.get("options", []):
                for ch in o.get("choices", []) or []:
                    if o["name"] in rows and "`%s`" % ch not in rows[o["name"]] \
                            and '"%s"' % ch not in rows[o["name"]]:
                        errors.append("option of %s: %s's choice %s is not in its row"
                                      % (op, o["name"], ch))
            for meth in spec.get("methods", []) or []:
                if "`%s`" % meth not in text:
                    errors.append("method of %s: %s is not documented" % (op, meth))
            compare("result of %s" % op, spec.get("results", []),
                    re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", text), errors, one_way=True)
    flags = []
    for f in FLAG.findall(help_txt):
        if f not in flags:
            flags.append(f)
    if not flags:
        errors.append("cli: `curvd --help` printed no flags")
    compare("flag", flags, first_cells(b.get("cli", [])), errors)
    return errors, notes


def self_test(doc, routes_txt, ops, help_txt):
    """Each mutation must be caught; the unmutated inputs must pass."""
    ok = True
    base, _ = check(doc, routes_txt, ops, help_txt)
    if base:
        print("self-test: the real inputs do not pass")
        return False
    first_route = next(l for l in doc.splitlines() if ROW.match(l) and "`/v1/health`" in l)
    op0 = ops["ops"][0]
    ops_new_op = dict(ops, ops=ops["ops"] + ["zz_new_op"])
    ops_new_curv = dict(ops, curvatures=ops["curvatures"] + ["zz_new_curvature"])
    ops_new_status = dict(ops, statuses=["queued", "running", "succeeded", "failed", "cancelled",
                                         "zz_new_status"])
    specs = ops["op_specs"]
    specs_new_opt = json.loads(json.dumps(specs))
    specs_new_opt[op0].setdefault("options", []).append({"name": "zz_new_option", "type": "boolean"})
    cases = [
        ("route added without docs", doc, routes_txt + "GET /v1/zz_new_route\n", ops, help_txt),
        ("route line removed from the docs", doc.replace(first_route + "\n", ""), routes_txt, ops,
         help_txt),
        ("op added without docs", doc, routes_txt, ops_new_op, help_txt),
        ("curvature added without docs", doc, routes_txt, ops_new_curv, help_txt),
        ("status added without docs", doc, routes_txt, ops_new_status, help_txt),
        ("option added without docs", doc, routes_txt, dict(ops, op_specs=specs_new_opt), help_txt),
        ("flag added without docs", doc, routes_txt, ops, help_txt + "  --zz-new-flag N\n"),
    ]
    for name, d, r, o, h in cases:
        errs, _ = check(d, r, o, h)
        caught = any("zz_new" in x or "zz-new" in x or "/v1/health" in x for x in errs)
        print("self-test: %-34s %s" % (name, "caught" if caught else "NOT CAUGHT"))
        ok &= caught
    return ok


def main(argv):
    st = argv[1:2] == ["--self-test"]
    args = argv[2:] if st else argv[1:]
    if len(args) != 4:
        print(__doc__)
        return 2
    doc, routes_txt, ops_txt, help_txt = (open(p, encoding="utf-8").read() for p in args)
    ops = json.loads(ops_txt)
    if st:
        return 0 if self_test(doc, routes_txt, ops, help_txt) else 1
    errors, notes = check(doc, routes_txt, ops, help_txt)
    routes = [l for l in routes_txt.splitlines() if l.strip()]
    for n in notes:
        print("note:", n)
    for e in errors:
        print("FAIL:", e)
    nopts = sum(len(s.get("options", [])) for s in (ops.get("op_specs") or {}).values())
    print("interface: %d routes, %d ops, %d options, %d curvatures checked; %d differences"
          % (len(routes), len(ops.get("ops", [])), nopts,
             len(ops.get("curvatures", [])), len(errors)))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
