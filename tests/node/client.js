// A Node.js client of deltaserve's gRPC API, built at run time from the repository's own
// protos/deltaserve/v1/deltaserve.proto with @grpc/proto-loader (no generated code).
//
//   node client.js HOST:PORT '<JSON plan>'
//
// The plan: {"requests": [GenerateRequest as JSON, ...], "missing_adapter": "name"}. Each request is sent
// once to Generation/Generate and once to Generation/GenerateStream; then one Generate names
// missing_adapter, which must fail. Prints one JSON object:
//   {"generate": [GenerateResponse, ...], "stream": [[GenerateResponse, ...], ...],
//    "missing": {"code": <gRPC status number>, "details": "..."}}
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
const DEADLINE_MS = 120000;

function loadGenerationClient(target) {
  const definition = protoLoader.loadSync(path.join(PROTO_ROOT, "deltaserve", "v1", "deltaserve.proto"), {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto (token_ids, finish_reason), like the Python client
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).deltaserve.v1;
  return new v1.Generation(target, grpc.credentials.createInsecure());
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

function generate(client, request) {
  return new Promise((resolve, reject) => {
    client.Generate(request, { deadline: deadline() }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function generateStream(client, request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = client.GenerateStream(request, { deadline: deadline() });
    call.on("data", (chunk) => chunks.push(chunk));
    call.on("error", reject);
    call.on("end", () => resolve(chunks));
  });
}

async function main() {
  const [target, planText] = process.argv.slice(2);
  if (!target || !planText) {
    console.error("usage: node client.js HOST:PORT '<JSON plan>'");
    process.exit(2);
  }
  const plan = JSON.parse(planText);
  const client = loadGenerationClient(target);
  const result = { generate: [], stream: [], missing: null };
  for (const request of plan.requests) {
    result.generate.push(await generate(client, request));
    result.stream.push(await generateStream(client, request));
  }
  try {
    await generate(client, { adapter_id: plan.missing_adapter, prompt: "hello", max_new_tokens: 2 });
  } catch (err) {
    result.missing = { code: err.code, details: err.details };
  }
  client.close();
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
