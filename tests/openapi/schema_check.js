// schema_check.js - checks JSON documents against the schemas of the OpenAPI
// document (components.schemas, e.g. Job or JobStatus) with ajv: that the
// documents curvd accepts and answers fit the spec, and that the ones it
// refuses do not.
//
// Usage: NODE_PATH=build/npm-openapi/node_modules node schema_check.js SPEC.json CASES.jsonl
// SPEC.json: the spec as JSON (validate.js writes it).  CASES.jsonl: one case
// a line, {"name", "schema": "Job", "valid": true|false, "doc": {...}}.
// Prints each case whose outcome differs from "valid" (with ajv's errors),
// then "N cases, M wrong"; exit status 0 when none is wrong, 1 otherwise,
// 2 on a usage or setup error.
'use strict';
const fs = require('fs');

let Ajv;
try {
  Ajv = require('ajv');
} catch (e) {
  console.error('schema_check.js: ajv is not installed (NODE_PATH?): ' + e.message);
  process.exit(2);
}

function main() {
  const [specFile, casesFile] = process.argv.slice(2);
  if (!specFile || !casesFile) {
    console.error('usage: node schema_check.js SPEC.json CASES.jsonl');
    return 2;
  }
  const spec = JSON.parse(fs.readFileSync(specFile, 'utf8'));
  // OpenAPI 3.0 schema objects: nullable is ajv's own; discriminator, example
  // and x-* are annotations here (oneOf already picks one schema per op).
  const ajv = new Ajv({ strict: false, allErrors: false, validateFormats: false });
  ajv.addSchema({ components: spec.components }, 'spec');
  const lines = fs.readFileSync(casesFile, 'utf8').split('\n').filter((l) => l.trim());
  let wrong = 0;
  for (const line of lines) {
    const c = JSON.parse(line);
    const validate = ajv.getSchema('spec#/components/schemas/' + c.schema);
    if (!validate) {
      console.log('no schema ' + c.schema + ' (case ' + c.name + ')');
      wrong++;
      continue;
    }
    const ok = validate(c.doc);
    if (ok !== c.valid) {
      wrong++;
      console.log((c.valid ? 'refused by ' : 'accepted by ') + c.schema + ': ' + c.name +
                  (ok ? '' : ': ' + ajv.errorsText(validate.errors).slice(0, 600)));
    } else if (process.env.VERBOSE) {
      console.log('ok   ' + c.name + (c.valid ? ' fits ' : ' is refused by ') + c.schema);
    }
  }
  console.log(lines.length + ' cases, ' + wrong + ' wrong');
  return wrong ? 1 : 0;
}

process.exit(main());
