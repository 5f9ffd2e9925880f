// validate.js - validates an OpenAPI document with @apidevtools/swagger-parser
// (the OpenAPI 3.0/3.1 schema plus $ref resolution) and flags keys whose value
// is null: the trace of an unquoted comma in a flow-style YAML mapping
// ({description: a, b} makes "b" a key).  On success, writes the parsed
// document (refs kept) as JSON to OUT for tests/openapi/check_ops.py.
//
// Usage: NODE_PATH=build/npm-openapi/node_modules node validate.js SPEC.yaml [OUT.json]
// Exit status 0 valid, 1 invalid, 2 usage or setup error.
'use strict';
const fs = require('fs');

let SwaggerParser;
try {
  SwaggerParser = require('@apidevtools/swagger-parser');
} catch (e) {
  console.error('validate.js: @apidevtools/swagger-parser is not installed (NODE_PATH?): ' + e.message);
  process.exit(2);
}

const MAX_LINES = 25;

// Keys with a null value, except where null is a legitimate value.
function nullKeys(node, path, out) {
  if (Array.isArray(node)) {
    node.forEach((v, i) => nullKeys(v, path + '/' + i, out));
  } else if (node && typeof node === 'object') {
    for (const [k, v] of Object.entries(node)) {
      if (k === 'example' || k === 'default' || k === 'enum') continue;
      if (v === null) out.push(path + '/' + k);
      else nullKeys(v, path + '/' + k, out);
    }
  }
  return out;
}

async function main() {
  const [spec, outFile] = process.argv.slice(2);
  if (!spec) {
    console.error('usage: node validate.js SPEC.yaml [OUT.json]');
    return 2;
  }
  let raw;
  try {
    raw = JSON.parse(JSON.stringify(await SwaggerParser.parse(spec)));
  } catch (e) {
    console.log(spec + ': cannot be parsed: ' + e.message.split('\n').slice(0, MAX_LINES).join('\n'));
    return 1;
  }
  const nulls = nullKeys(raw, '#', []);
  if (nulls.length) {
    console.log(spec + ': keys without a value (an unquoted comma in a flow mapping?):');
    nulls.slice(0, MAX_LINES).forEach((p) => console.log('  ' + p));
    return 1;
  }
  try {
    const api = await SwaggerParser.validate(spec);
    console.log(spec + ': valid OpenAPI ' + (api.openapi || api.swagger) + ' (' +
                Object.keys(api.paths || {}).length + ' paths, ' +
                Object.keys((api.components || {}).schemas || {}).length + ' schemas)');
  } catch (e) {
    const lines = e.message.split('\n');
    console.log(spec + ': invalid: ' + lines.slice(0, MAX_LINES).join('\n'));
    if (lines.length > MAX_LINES) console.log('  ... ' + (lines.length - MAX_LINES) + ' more lines');
    return 1;
  }
  if (outFile) fs.writeFileSync(outFile, JSON.stringify(raw, null, 1) + '\n');
  return 0;
}

main().then((rc) => process.exit(rc), (e) => {
  console.error('validate.js: ' + (e && e.stack || e));
  process.exit(2);
});
