// The manifest's JSON Schema, the same file export.verify reads (export/runtime/manifest.schema.json), and
// the small validator that applies it: the keywords that file uses (draft 2020-12 meanings), the
// same list as export/runtime/schema.py. A schema holding any other keyword is refused, never ignored.
import fs from 'node:fs';

export const SCHEMA_URL = new URL('../../export/runtime/manifest.schema.json', import.meta.url);
const ANNOTATIONS = new Set(['$schema', '$id', 'title', 'description', '$defs']);
const KEYWORDS = new Set(['type', 'required', 'properties', 'items', 'minItems', 'maxItems', 'minLength', 'pattern',
  'minimum', 'maximum', 'exclusiveMinimum', 'anyOf', 'dependentRequired', '$ref', 'enum']);

let cached = null;

/** The manifest schema, read once and checked for keywords this validator does not apply. */
export function manifestSchema() {
  if (!cached) {
    const schema = JSON.parse(fs.readFileSync(SCHEMA_URL, 'utf8'));
    checkSchema(schema);
    cached = schema;
  }
  return cached;
}

/** Throws naming the first keyword `validate` does not apply, anywhere in `schema`. */
export function checkSchema(schema, where = '#') {
  if (!schema || typeof schema !== 'object') return;
  const unknown = Object.keys(schema).filter((k) => !KEYWORDS.has(k) && !ANNOTATIONS.has(k)).sort();
  if (unknown.length) throw new Error(`schema keyword(s) ${JSON.stringify(unknown)} at ${where} are not implemented`);
  for (const key of ['properties', '$defs']) {
    for (const [name, sub] of Object.entries(schema[key] ?? {})) checkSchema(sub, `${where}/${key}/${name}`);
  }
  if (schema.items) checkSchema(schema.items, `${where}/items`);
  (schema.anyOf ?? []).forEach((sub, i) => checkSchema(sub, `${where}/anyOf/${i}`));
}

function short(value) {
  const text = JSON.stringify(value) ?? String(value);
  return text.length <= 60 ? text : `${text.slice(0, 56)}...`;
}

function is(value, kind) {
  switch (kind) {
    case 'null': return value === null;
    case 'boolean': return typeof value === 'boolean';
    case 'number': return typeof value === 'number' && Number.isFinite(value);
    case 'integer': return typeof value === 'number' && Number.isInteger(value);
    case 'string': return typeof value === 'string';
    case 'array': return Array.isArray(value);
    case 'object': return value !== null && typeof value === 'object' && !Array.isArray(value);
    default: throw new Error(`schema type ${kind} is not implemented`);
  }
}

/** The first place (`$.inputs[0].shape` and what it must be) where `value` does not match, or null. */
export function validate(value, schema, root = schema, where = '$') {
  if (schema.$ref) {
    let target = root;
    for (const part of schema.$ref.replace(/^#\//, '').split('/')) target = target[part];
    const problem = validate(value, target, root, where);
    if (problem) return problem;
  }
  if (schema.type !== undefined) {
    const kinds = Array.isArray(schema.type) ? schema.type : [schema.type];
    if (!kinds.some((k) => is(value, k))) return `${where} must be ${kinds.join(' or ')}, not ${short(value)}`;
  }
  if (schema.enum && !schema.enum.some((e) => JSON.stringify(e) === JSON.stringify(value))) {
    return `${where} must be one of ${short(schema.enum)}, not ${short(value)}`;
  }
  if (typeof value === 'string') {
    // Code points, as Python counts a str's length.
    if ([...value].length < (schema.minLength ?? 0)) return `${where} must hold at least ${schema.minLength} character(s)`;
    if (schema.pattern !== undefined && !new RegExp(schema.pattern, 'u').test(value)) {
      return `${where} must match ${schema.pattern}, not ${short(value)}`;
    }
  }
  if (is(value, 'number')) {
    if (schema.minimum !== undefined && value < schema.minimum) return `${where} must be >= ${schema.minimum}, not ${value}`;
    if (schema.maximum !== undefined && value > schema.maximum) return `${where} must be <= ${schema.maximum}, not ${value}`;
    if (schema.exclusiveMinimum !== undefined && !(value > schema.exclusiveMinimum)) {
      return `${where} must be > ${schema.exclusiveMinimum}, not ${value}`;
    }
  }
  if (Array.isArray(value)) {
    if (value.length < (schema.minItems ?? 0)) return `${where} must hold at least ${schema.minItems} item(s)`;
    if (schema.maxItems !== undefined && value.length > schema.maxItems) return `${where} must hold at most ${schema.maxItems} item(s)`;
    if (schema.items) {
      for (let i = 0; i < value.length; i++) {
        const problem = validate(value[i], schema.items, root, `${where}[${i}]`);
        if (problem) return problem;
      }
    }
  }
  if (is(value, 'object')) {
    for (const key of schema.required ?? []) {
      if (!Object.hasOwn(value, key)) return `${where} lacks '${key}'`;
    }
    for (const [key, needs] of Object.entries(schema.dependentRequired ?? {})) {
      const missing = needs.filter((n) => Object.hasOwn(value, key) && !Object.hasOwn(value, n));
      if (missing.length) return `${where} has '${key}' but lacks '${missing[0]}'`;
    }
    for (const [key, sub] of Object.entries(schema.properties ?? {})) {
      if (Object.hasOwn(value, key)) {
        const problem = validate(value[key], sub, root, `${where}.${key}`);
        if (problem) return problem;
      }
    }
  }
  if (schema.anyOf) {
    const problems = schema.anyOf.map((sub) => validate(value, sub, root, where));
    if (problems.every(Boolean)) return problems.join(' or ');
  }
  return null;
}
