#!/usr/bin/env python3
"""check_ops.py - checks api/openapi.yaml's per-op schemas against the op table.

The op table is the body of GET /v1/ops: {"ops", "curvatures", "statuses",
"op_specs": {op: {"uses_curvature", "blockwise", "methods"?, "options": [{"name",
"type", "min"?, "max"?, "choices"?, "methods"?}], "results": [names]}}}.
The spec is api/openapi.yaml as JSON (tests/openapi/validate.js writes it).

Compared, per op: the Job schema's discriminator entry (op, x-uses-curvature,
blocks), its options schema (every option both ways: type, minimum/maximum,
enum, x-methods; the method enum against "methods"; no other options), and its
result schema's fields (both ways).  Also ops, curvatures and statuses.

Usage: check_ops.py SPEC.json OPS.json            exit 0 when they agree
       check_ops.py --self-test SPEC.json OPS.json  checks that the checker
           catches a missing, extra or changed option, result, op or bound
           (on copies), after checking that the unchanged pair agrees.
       check_ops.py --result SPEC.json STATUS.json  checks that a succeeded
           job's result (GET /v1/jobs/{id} body) has only fields its op's
           JobResult schema names, in the envelope and in each block.
Python 3 standard library only.
"""
import copy
import json
import sys

REF = "#/components/schemas/"


def camel(op):
    return "".join(w[:1].upper() + w[1:] for w in op.split("_"))


class Spec:
    """The OpenAPI document with $ref resolution inside components.schemas."""

    def __init__(self, doc):
        self.doc = doc
        self.schemas = doc.get("components", {}).get("schemas", {})

    def resolve(self, s):
        seen = 0
        while isinstance(s, dict) and "$ref" in s:
            ref = s["$ref"]
            if not ref.startswith(REF) or ref[len(REF):] not in self.schemas:
                raise KeyError("unresolvable $ref %s" % ref)
            s = self.schemas[ref[len(REF):]]
            seen += 1
            if seen > 50:
                raise KeyError("$ref loop at %s" % ref)
        return s if isinstance(s, dict) else {}

    def props(self, s):
        """Properties of a schema, through $ref and allOf."""
        s = self.resolve(s)
        out = dict(s.get("properties", {}))
        for part in s.get("allOf", []):
            out.update(self.props(part))
        return out


def num_eq(a, b):
    if a is None or b is None:
        return a is None and b is None
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b))


def check_number(where, s, o, jtype, bad):
    if s.get("type") != jtype:
        bad("%s: type %s in the spec, %s in the op table" % (where, s.get("type"), jtype))
    for key, skey in (("min", "minimum"), ("max", "maximum")):
        if not num_eq(s.get(skey), o.get(key)):
            bad("%s: %s %s in the spec, %s %s in the op table"
                % (where, skey, s.get(skey), key, o.get(key)))


def check_enum(where, s, choices, bad):
    if s.get("type") != "string" or sorted(s.get("enum") or []) != sorted(choices or []):
        bad("%s: enum %s (type %s) in the spec, choices %s in the op table"
            % (where, s.get("enum"), s.get("type"), choices))


def check_list(spec, where, s, bad):
    items = spec.resolve(s.get("items", {}))
    if s.get("type") != "array" or items.get("type") != "number":
        bad("%s: the spec needs an array of numbers for type list" % where)


def check_option(spec, where, s, o, bad):
    s = spec.resolve(s)
    t = o.get("type")
    if t in ("integer", "number"):
        check_number(where, s, o, t, bad)
    elif t == "boolean":
        if s.get("type") != "boolean":
            bad("%s: type %s in the spec, boolean in the op table" % (where, s.get("type")))
    elif t == "enum":
        check_enum(where, s, o.get("choices"), bad)
    elif t in ("number_or_enum", "integer_or_enum"):
        alts = [spec.resolve(a) for a in s.get("oneOf", [])]
        nums = [a for a in alts if a.get("type") in ("number", "integer")]
        strs = [a for a in alts if a.get("type") == "string"]
        if len(alts) != 2 or len(nums) != 1 or len(strs) != 1:
            bad("%s: the spec needs oneOf [a %s, a string enum] for type %s"
                % (where, t.split("_")[0], t))
        else:
            check_number(where, nums[0], o, t.split("_")[0], bad)
            check_enum(where, strs[0], o.get("choices"), bad)
    elif t == "list":
        check_list(spec, where, s, bad)
    elif t == "enum_or_list":
        alts = [spec.resolve(a) for a in s.get("oneOf", [])]
        lists = [a for a in alts if a.get("type") == "array"]
        strs = [a for a in alts if a.get("type") == "string"]
        if len(alts) != 2 or len(lists) != 1 or len(strs) != 1:
            bad("%s: the spec needs oneOf [a string enum, an array of numbers] for type %s"
                % (where, t))
        else:
            check_list(spec, where, lists[0], bad)
            check_enum(where, strs[0], o.get("choices"), bad)
    elif t == "enum_list":
        items = spec.resolve(s.get("items", {}))
        if s.get("type") != "array":
            bad("%s: the spec needs an array of string enums for type enum_list" % where)
        else:
            check_enum(where, items, o.get("choices"), bad)
    elif t == "number_or_list":
        alts = [spec.resolve(a) for a in s.get("oneOf", [])]
        nums = [a for a in alts if a.get("type") == "number"]
        lists = [a for a in alts if a.get("type") == "array"]
        if len(alts) != 2 or len(nums) != 1 or len(lists) != 1:
            bad("%s: the spec needs oneOf [a number, an array of numbers] for type %s"
                % (where, t))
        else:
            check_number(where, nums[0], o, "number", bad)
            check_list(spec, where, lists[0], bad)
    elif t in ("name", "boolean_or_name"):
        alts = [spec.resolve(a) for a in s.get("oneOf", [s])]
        strs = [a for a in alts if a.get("type") == "string"]
        bools = [a for a in alts if a.get("type") == "boolean"]
        if len(strs) != 1 or len(bools) != (t == "boolean_or_name") or \
                len(alts) != 1 + len(bools) or \
                strs[0].get("pattern") != "^[A-Za-z0-9_.-]{1,64}$":
            bad("%s: the spec needs %sa string with pattern ^[A-Za-z0-9_.-]{1,64}$ for type %s"
                % (where, "oneOf [a boolean, " if bools else "", t))
    else:
        bad("%s: unknown option type %r in the op table" % (where, t))
    if sorted(s.get("x-methods") or []) != sorted(o.get("methods") or []):
        bad("%s: x-methods %s in the spec, methods %s in the op table"
            % (where, s.get("x-methods"), o.get("methods")))


def check_op(spec, op, os_, bad):
    job = spec.resolve(spec.schemas.get("Job", {}))
    mapping = job.get("discriminator", {}).get("mapping", {})
    if op not in mapping:
        bad("op %s: missing from Job's discriminator mapping" % op)
        return
    j = spec.resolve({"$ref": mapping[op]})
    jp = j.get("properties", {})
    if (jp.get("op") or {}).get("enum") != [op]:
        bad("op %s: %s's property op is not enum [%s]" % (op, mapping[op], op))
    if j.get("additionalProperties") is not False:
        bad("op %s: %s must set additionalProperties false" % (op, mapping[op]))
    if j.get("x-uses-curvature") != os_.get("uses_curvature"):
        bad("op %s: x-uses-curvature %s in the spec, uses_curvature %s in the op table"
            % (op, j.get("x-uses-curvature"), os_.get("uses_curvature")))
    want_blocks = ("Blocks" if os_.get("blockwise") else
                   "BlocksOneGroup" if os_.get("uses_curvature") else "BlocksFull")
    if (jp.get("blocks") or {}).get("$ref") != REF + want_blocks:
        bad("op %s: blocks should be %s (blockwise %s)" % (op, want_blocks, os_.get("blockwise")))

    # options, both ways
    opt_schema = spec.resolve(jp.get("options", {}))
    if opt_schema.get("additionalProperties") is not False:
        bad("op %s: its options schema must set additionalProperties false" % op)
    sprops = spec.props(jp.get("options", {}))
    table = {o.get("name"): o for o in os_.get("options", [])}
    for name in sorted(set(table) - set(sprops)):
        bad("op %s: option %s is in the op table but not in the spec" % (op, name))
    for name in sorted(set(sprops) - set(table)):
        bad("op %s: option %s is in the spec but not in the op table" % (op, name))
    for name in sorted(set(table) & set(sprops)):
        check_option(spec, "op %s option %s" % (op, name), sprops[name], table[name], bad)
    methods = os_.get("methods")
    if methods is not None or "method" in sprops:
        got = spec.resolve(sprops.get("method", {})).get("enum")
        if sorted(got or []) != sorted(methods or []):
            bad("op %s: method enum %s in the spec, methods %s in the op table" % (op, got, methods))

    # results, both ways
    rname = camel(op) + "Result"
    if rname not in spec.schemas:
        bad("op %s: no schema %s" % (op, rname))
        return
    rmap = spec.resolve(spec.schemas.get("JobResult", {})).get("discriminator", {}).get("mapping", {})
    if op not in rmap:
        bad("op %s: missing from JobResult's discriminator mapping" % op)
    elif REF + rname not in json.dumps(spec.resolve({"$ref": rmap[op]})):
        bad("op %s: %s does not use %s" % (op, rmap[op], rname))
    rprops = set(spec.props({"$ref": REF + rname}))
    results = set(os_.get("results", []))
    for name in sorted(results - rprops):
        bad("op %s: result field %s is in the op table but not in %s" % (op, name, rname))
    for name in sorted(rprops - results):
        bad("op %s: result field %s is in %s but not in the op table" % (op, name, rname))


def check(doc, ops):
    """Problems (strings) found comparing the spec doc with the /v1/ops body."""
    problems = []
    bad = problems.append
    spec = Spec(doc)
    try:
        job = spec.resolve(spec.schemas.get("Job", {}))
        mapping = job.get("discriminator", {}).get("mapping", {})
        refs = sorted(a.get("$ref", "") for a in job.get("oneOf", []))
        if refs != sorted(mapping.values()):
            bad("Job: oneOf and discriminator mapping differ")
        if job.get("discriminator", {}).get("propertyName") != "op":
            bad("Job: the discriminator must be op")
        names = list(ops.get("ops", []))
        if sorted(names) != sorted(mapping):
            bad("ops: GET /v1/ops has %s, Job's mapping %s" % (sorted(names), sorted(mapping)))
        curv = spec.resolve(spec.schemas.get("Curvature", {})).get("enum")
        if sorted(ops.get("curvatures", [])) != sorted(curv or []):
            bad("curvatures: GET /v1/ops has %s, schema Curvature %s" % (ops.get("curvatures"), curv))
        if "statuses" in ops:
            st = spec.resolve(spec.schemas.get("JobStatusName", {})).get("enum")
            if sorted(ops["statuses"]) != sorted(st or []):
                bad("statuses: GET /v1/ops has %s, schema JobStatusName %s" % (ops["statuses"], st))
        specs = ops.get("op_specs")
        if specs is not None:
            if sorted(specs) != sorted(names):
                bad("op_specs: ops %s, op_specs %s" % (sorted(names), sorted(specs)))
            for op in sorted(set(specs) | set(mapping)):
                if op not in specs:
                    bad("op %s: in the spec but not in op_specs" % op)
                else:
                    check_op(spec, op, specs[op], bad)
    except KeyError as e:
        bad("spec: %s" % e.args[0])
    return problems


def mutations(doc, ops):
    """(description, doc copy, ops copy) pairs that check() must refuse."""
    specs = ops["op_specs"]
    ops_with_opts = [op for op in sorted(specs) if specs[op]["options"]]
    op = "trace" if "trace" in specs else ops_with_opts[0]
    bounded = [o for o in specs[op]["options"] if "max" in o][0]["name"]
    out = []

    def add(desc, f_ops=None, f_doc=None):
        d, o = copy.deepcopy(doc), copy.deepcopy(ops)
        if f_ops:
            f_ops(o)
        if f_doc:
            f_doc(d)
        out.append((desc, d, o))

    add("an option missing from the op table", lambda o: o["op_specs"][op]["options"].pop())
    add("an option missing from the spec", f_doc=lambda d: d["components"]["schemas"][camel(op) + "Options"]
        ["properties"].pop(specs[op]["options"][0]["name"]))
    add("an extra option in the op table", lambda o: o["op_specs"][op]["options"].append(
        {"name": "no_such_option", "type": "boolean"}))
    add("a changed maximum", lambda o: [x.update(max=x["max"] + 1) for x in o["op_specs"][op]["options"]
                                        if x["name"] == bounded])
    add("a changed type", lambda o: o["op_specs"][op]["options"][0].update(type="list"))
    add("a result missing from the op table", lambda o: o["op_specs"][op]["results"].pop())
    add("an extra result in the op table", lambda o: o["op_specs"][op]["results"].append("no_such_field"))
    add("an op missing from op_specs", lambda o: o["op_specs"].pop(op))
    add("an extra op", lambda o: (o["ops"].append("no_such_op"),
                                  o["op_specs"].__setitem__("no_such_op", copy.deepcopy(specs[op]))))
    add("an extra curvature", lambda o: o["curvatures"].append("no_such_curvature"))
    add("blockwise flipped", lambda o: o["op_specs"][op].update(blockwise=not specs[op]["blockwise"]))
    return out


def check_result(doc, status):
    """Problems with the fields of a succeeded job's result."""
    spec = Spec(doc)
    res = status.get("result") or {}
    op = res.get("op")
    if status.get("status") != "succeeded" or not op:
        return ["job %s did not succeed: %s" % (status.get("id"), json.dumps(status)[:300])]
    rname = camel(op) + "Result"
    if rname not in spec.schemas:
        return ["result of op %s: no schema %s" % (op, rname)]
    fields = set(spec.props({"$ref": REF + rname}))
    envelope = set(spec.props({"$ref": REF + "ResultEnvelope"}))
    header = set(spec.props({"$ref": REF + "BlockHeader"}))
    problems = ["op %s: result field %s is not in %s" % (op, k, rname)
                for k in sorted(set(res) - fields - envelope - {"blocks"})]
    for i, b in enumerate(res.get("blocks") or []):
        problems += ["op %s: blocks[%d] field %s is not in %s" % (op, i, k, rname)
                     for k in sorted(set(b) - fields - header)]
    return problems


def main(argv):
    mode = argv[1] if argv[1:2] in (["--self-test"], ["--result"]) else None
    args = argv[2:] if mode else argv[1:]
    if len(args) != 2:
        print([p for p in __doc__.split("\n\n") if p.startswith("Usage")][0], file=sys.stderr)
        return 2
    with open(args[0]) as f:
        doc = json.load(f)
    with open(args[1]) as f:
        ops = json.load(f)
    if mode == "--result":
        problems = check_result(doc, ops)
        for p in problems:
            print("check_ops: " + p)
        return 1 if problems else 0
    self_test = mode == "--self-test"
    problems = check(doc, ops)
    for p in problems:
        print("check_ops: " + p)
    if problems:
        return 1
    n = len(ops.get("op_specs") or {})
    if not self_test:
        if not n:
            print("check_ops: ops and curvatures agree (no op_specs to compare)")
            return 0
        print("check_ops: the spec agrees with the op table (%d ops, %d options)"
              % (n, sum(len(s["options"]) for s in (ops.get("op_specs") or {}).values())))
        return 0
    if not n:
        print("check_ops: --self-test needs op_specs")
        return 1
    missed = [desc for desc, d, o in mutations(doc, ops) if not check(d, o)]
    for desc in missed:
        print("check_ops: self-test: not caught: " + desc)
    if not missed:
        print("check_ops: self-test: every mutation caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
