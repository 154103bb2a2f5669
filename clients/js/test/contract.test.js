// The machine-readable contracts: docs/asyncapi.yaml is a valid AsyncAPI 3.0 document, and the
// SDK's TypeScript wire types (src/confab.d.ts, interface WireSchemas) agree with it property by
// property: same names, same optionality, same `op`/`type` constants. Properties documented as
// "SDK only" in the .d.ts are additions of the SDK and are not on the wire.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Parser } from "@asyncapi/parser";
import ts from "typescript";
import { REPO } from "./harness.js";

const ASYNCAPI = join(REPO, "docs/asyncapi.yaml");
const DTS = join(REPO, "clients/js/src/confab.d.ts");
const USAGE = join(REPO, "clients/js/test/types/usage.ts");

async function parsed() {
  const parser = new Parser();
  const { document, diagnostics } = await parser.parse(readFileSync(ASYNCAPI, "utf8"));
  // Severity 0 is an error; warnings and hints (style advice) do not fail the contract.
  const errors = diagnostics.filter((d) => d.severity === 0);
  return { document, errors, diagnostics };
}

test("docs/asyncapi.yaml is a valid AsyncAPI 3.0 document", async () => {
  const { document, errors } = await parsed();
  assert.deepEqual(errors.map((e) => `${e.path.join(".")}: ${e.message}`), []);
  assert.ok(document, "parsed");
  assert.equal(document.version(), "3.0.0");
});

test("the AsyncAPI document names every op, event, error code and close code of SPEC §4", async () => {
  const { document } = await parsed();
  const json = document.json();
  const ops = new Set(Object.values(json.components.schemas).map((s) => s.properties?.op?.const).filter(Boolean));
  for (const op of ["hello", "send", "edit", "delete", "typing", "history", "join", "leave", "read", "presence_sub", "ping", "ready", "ack", "presence", "pong", "error", "event"]) assert.ok(ops.has(op), `op ${op}`);
  const types = new Set(Object.values(json.components.schemas).map((s) => s.properties?.type?.const).filter(Boolean));
  for (const t of ["message", "message_edited", "message_deleted", "member_joined", "member_left", "typing", "read", "presence", "channel_added", "resync"]) assert.ok(types.has(t), `event ${t}`);
  assert.deepEqual(json.components.schemas.ErrorCode.enum.sort(), ["bad_request", "forbidden", "not_found", "rate_limited", "too_large", "unavailable"]);
  assert.deepEqual(Object.keys(json["x-close-codes"]).sort(), ["1000", "1001", "1009", "4000", "4001", "4002", "4003", "4004", "4008", "4010"]);
});

/** name → { props: Map(name → {optional, literal}) } for each member type of WireSchemas. */
function wireTypes() {
  const program = ts.createProgram([DTS], { strict: true, noEmit: true });
  const checker = program.getTypeChecker();
  const source = program.getSourceFile(DTS);
  const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n"));
  assert.deepEqual(diagnostics, [], "confab.d.ts type-checks");
  let wire;
  ts.forEachChild(source, (node) => {
    if (ts.isInterfaceDeclaration(node) && node.name.text === "WireSchemas") wire = node;
  });
  assert.ok(wire, "interface WireSchemas");
  const out = new Map();
  for (const member of checker.getTypeAtLocation(wire).getProperties()) {
    const type = checker.getTypeOfSymbolAtLocation(member, wire);
    const props = new Map();
    for (const p of type.getProperties()) {
      const doc = ts.displayPartsToString(p.getDocumentationComment(checker));
      if (doc.startsWith("SDK only")) continue;
      const pt = checker.getTypeOfSymbolAtLocation(p, wire);
      props.set(p.name, {
        optional: (p.flags & ts.SymbolFlags.Optional) !== 0,
        literal: pt.isStringLiteral() ? pt.value : undefined,
      });
    }
    out.set(member.name, props);
  }
  return out;
}

test("the SDK's TypeScript wire types and the AsyncAPI schemas have the same properties", async () => {
  const { document } = await parsed();
  const schemas = document.json().components.schemas;
  const types = wireTypes();
  assert.ok(types.size >= 29, `WireSchemas lists ${types.size} types`);
  const mismatches = [];
  for (const [name, props] of types) {
    const schema = schemas[name];
    if (!schema) {
      mismatches.push(`${name}: no such schema in asyncapi.yaml`);
      continue;
    }
    const required = new Set(schema.required || []);
    const wanted = Object.keys(schema.properties || {});
    for (const p of wanted) {
      const t = props.get(p);
      if (!t) mismatches.push(`${name}.${p}: in asyncapi.yaml, not in confab.d.ts`);
      else if (t.optional === required.has(p)) mismatches.push(`${name}.${p}: ${t.optional ? "optional" : "required"} in confab.d.ts, ${required.has(p) ? "required" : "optional"} in asyncapi.yaml`);
      else if (schema.properties[p].const !== undefined && t.literal !== schema.properties[p].const) mismatches.push(`${name}.${p}: ${JSON.stringify(t.literal)} in confab.d.ts, ${JSON.stringify(schema.properties[p].const)} in asyncapi.yaml`);
    }
    for (const p of props.keys()) if (!wanted.includes(p)) mismatches.push(`${name}.${p}: in confab.d.ts, not in asyncapi.yaml`);
  }
  // Every frame schema of the document has its type in the SDK.
  for (const [name, schema] of Object.entries(schemas)) {
    if (schema.properties?.op && !types.has(name)) mismatches.push(`${name}: in asyncapi.yaml, not in WireSchemas`);
  }
  assert.deepEqual(mismatches, []);
});

test("the README's usage type-checks against confab.d.ts", () => {
  const program = ts.createProgram([USAGE], { strict: true, noEmit: true, target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext, lib: ["lib.es2022.d.ts", "lib.dom.d.ts"] });
  const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => `${d.file ? d.file.fileName.split("/").pop() : ""}: ${ts.flattenDiagnosticMessageText(d.messageText, "\n")}`);
  assert.deepEqual(diagnostics, []);
});
