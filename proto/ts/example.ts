// What a TypeScript pipeline writes against the generated cnp.v1 client: a CreateAudit
// request, and the fields a CI gate reads from an AuditReport. `tsc` type-checks it
// against the generated code (tests/test_api_toolchain.py): a renamed or retyped field
// fails here before it reaches a client.
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { type AuditReport, AuditReportSchema } from "./gen/cnp/v1/report_pb.js";
import { CreateAuditRequestSchema, State } from "./gen/cnp/v1/service_pb.js";

export const request = create(CreateAuditRequestSchema, {
  spec: {
    model: { architecture: "resnet18", weights: "models:/shapes/1", classes: ["disc", "ring"] },
    dataset: { root: "/data/shapes" },
    layers: ["layer3"],
    attributes: ["watermark"],
    positiveClassName: "ring",
    prune: { method: "cnp", rate: 0.2 },
  },
  requestId: "ci-4711",
  tracking: { experiment: "ci", tags: { commit: "0a1b2c3" }, registerModel: "shapes-pruned" },
});

export function gate(report: AuditReport): string[] {
  const failures: string[] = [];
  for (const audit of report.attributes) {
    const flagged = audit.subspaces[audit.flaggedSubspace];
    const low: number = flagged?.apAttribute?.ciLow ?? 0;
    if (low >= 0.9) {
      failures.push(`${audit.attribute}=${audit.value}: AP ${low} in ${audit.layer}`);
    }
  }
  const worst = report.before?.worstGroupAccuracy;
  if (worst !== undefined && worst.ciHigh < 0.6) {
    failures.push(`worst group ${report.before?.worstGroup}: ${worst.value}`);
  }
  return failures;
}

export const roundTrip: AuditReport = fromBinary(
  AuditReportSchema,
  toBinary(AuditReportSchema, create(AuditReportSchema, { classNames: ["disc", "ring"] })),
);
export const running: State = State.RUNNING;
