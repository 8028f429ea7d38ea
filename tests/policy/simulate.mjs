// Evaluates one request against the shipped policies with @cloud-copilot/iam-simulate, the
// way AWS combines identity, resource and key policies, conditions included.
//
// Why a shim: the pinned simulator (0.1.173) matches condition keys with a variable part
// only when the variable follows a `/` (as in `aws:RequestTag/<k>`). Keys of the form
// `kms:EncryptionContext:<k>` therefore land in `ignoredContextKeys`, and every statement
// conditioned on an encryption context quietly fails to match: a "node cannot decrypt"
// case would pass for the wrong reason. `shim()` renames those keys consistently, in
// condition keys, in `${...}` policy variables and in the request context, to
// `aws:RequestTag/<k>`, which the simulator evaluates as a single-valued string, as KMS
// treats encryption context values. `evaluate()` refuses a result that ignored any key.

import { runSimulation } from '@cloud-copilot/iam-simulate';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const EC_PREFIX = 'kms:EncryptionContext:';
const STAND_IN = 'aws:RequestTag/';

/**
 * The key policy AWS creates by default: it leaves every decision to IAM. KMS always
 * evaluates a key policy, so a KMS request needs one.
 */
export function defaultKeyPolicy(account) {
  return {
    Version: '2012-10-17',
    Statement: [
      {
        Sid: 'EnableIamUserPermissions',
        Effect: 'Allow',
        Principal: { AWS: `arn:aws:iam::${account}:root` },
        Action: 'kms:*',
        Resource: '*',
      },
    ],
  };
}

/** Reads a policy document shipped in the repository (path relative to its root). */
export function loadPolicy(rel) {
  return JSON.parse(fs.readFileSync(path.join(ROOT, rel), 'utf8'));
}

function renameKey(key) {
  // Condition keys are case-insensitive in IAM; the prefix is matched that way too.
  return key.toLowerCase().startsWith(EC_PREFIX.toLowerCase())
    ? STAND_IN + key.slice(EC_PREFIX.length)
    : key;
}

function renameVariables(value) {
  if (typeof value === 'string') {
    return value.replace(/\$\{([^}]+)\}/g, (_, v) => '${' + renameKey(v) + '}');
  }
  if (Array.isArray(value)) return value.map(renameVariables);
  return value;
}

/** Every condition key a policy document uses (operator-independent). */
export function conditionKeys(policy) {
  const keys = [];
  for (const st of [].concat(policy.Statement ?? [])) {
    for (const byKey of Object.values(st.Condition ?? {})) keys.push(...Object.keys(byKey));
  }
  return keys;
}

/**
 * The policy with every `kms:EncryptionContext:<k>` condition key and policy variable
 * renamed to `aws:RequestTag/<k>`. Refuses a policy that already uses `aws:RequestTag/`:
 * the rename would then merge two different keys.
 */
export function shim(policy) {
  if (policy === undefined) return undefined;
  const clash = conditionKeys(policy).find((k) => k.toLowerCase().startsWith(STAND_IN.toLowerCase()));
  if (clash !== undefined || JSON.stringify(policy).includes('${' + STAND_IN)) {
    throw new Error(`policy already uses ${STAND_IN} (${clash ?? 'in a policy variable'}): the encryption-context shim would merge keys`);
  }
  const out = structuredClone(policy);
  for (const st of [].concat(out.Statement ?? [])) {
    for (const field of ['Resource', 'NotResource']) {
      if (st[field] !== undefined) st[field] = renameVariables(st[field]);
    }
    for (const [op, byKey] of Object.entries(st.Condition ?? {})) {
      const renamed = {};
      for (const [k, v] of Object.entries(byKey)) renamed[renameKey(k)] = renameVariables(v);
      st.Condition[op] = renamed;
    }
  }
  return out;
}

/** The request context with encryption-context keys renamed as `shim()` renames them. */
export function shimContext(context) {
  const out = {};
  for (const [k, v] of Object.entries(context)) {
    const key = renameKey(k);
    if (key !== k && Object.hasOwn(context, key)) {
      throw new Error(`context has both ${k} and ${key}`);
    }
    out[key] = v;
  }
  return out;
}

/**
 * Runs one request. `identity` is a list of `{name, policy}`; `resourcePolicy` is the bucket
 * policy or the key policy (for KMS a key policy is always evaluated, so callers pass one).
 * Returns `{decision, ignored}`: decision is "Allowed", "ExplicitlyDenied" or
 * "ImplicitlyDenied". With `{raw: true}` nothing is renamed (to show the simulator's gap).
 */
export async function evaluate({ principal, action, resource, account, context = {}, identity, resourcePolicy }, { raw = false } = {}) {
  const fix = raw ? (p) => p : shim;
  const result = await runSimulation(
    {
      request: {
        principal,
        action,
        resource: { resource, accountId: account },
        contextVariables: raw ? context : shimContext(context),
      },
      identityPolicies: identity.map(({ name, policy }) => ({ name, policy: fix(policy) })),
      serviceControlPolicies: [],
      resourceControlPolicies: [],
      resourcePolicy: fix(resourcePolicy),
    },
    {},
  );
  if (result.resultType !== 'single') {
    throw new Error(`simulation failed for ${action} on ${resource}: ${JSON.stringify(result.errors ?? result)}`);
  }
  return { decision: result.overallResult, ignored: result.result.ignoredContextKeys ?? [] };
}
