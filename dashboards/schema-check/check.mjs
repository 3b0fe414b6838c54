// Type-checks every dashboards/*.json against Grafana's own `Dashboard` type
// (@grafana/schema): each dashboard becomes `const d: Dashboard = <json>;` in a
// generated .ts file, and `tsc --noEmit --strict` rejects unknown fields (excess
// property checks on the literal) and wrong types.
import { readdirSync, readFileSync, writeFileSync, mkdirSync, rmSync } from "node:fs";
import { join, dirname, basename } from "node:path";
import { fileURLToPath } from "node:url";
import { spawnSync } from "node:child_process";

const here = dirname(fileURLToPath(import.meta.url));
const dashboards = join(here, "..");
const out = join(here, ".generated");
rmSync(out, { recursive: true, force: true });
mkdirSync(out);

const files = readdirSync(dashboards).filter((f) => f.endsWith(".json")).sort();
if (files.length === 0) {
  console.error("schema-check: no dashboards found");
  process.exit(1);
}
const sources = [];
for (const f of files) {
  const json = JSON.parse(readFileSync(join(dashboards, f), "utf8"));
  const ts = join(out, basename(f, ".json") + ".ts");
  writeFileSync(
    ts,
    `import type { Dashboard } from "@grafana/schema";\n` +
      `const dashboard: Dashboard = ${JSON.stringify(json, null, 2)};\n` +
      `export default dashboard;\n`,
  );
  sources.push(ts);
}
writeFileSync(
  join(out, "tsconfig.json"),
  JSON.stringify({
    compilerOptions: {
      strict: true,
      noEmit: true,
      target: "es2022",
      module: "esnext",
      moduleResolution: "bundler",
      skipLibCheck: true,
      types: [],
    },
    files: sources.map((s) => basename(s)),
  }),
);
const tsc = spawnSync(join(here, "node_modules", ".bin", "tsc"), ["-p", out], {
  stdio: "inherit",
});
if (tsc.status !== 0) {
  console.error(`schema-check: dashboards do not match @grafana/schema's Dashboard type`);
  process.exit(1);
}
console.log(`schema-check: ${files.length} dashboards match @grafana/schema's Dashboard type`);
