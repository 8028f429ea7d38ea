// The shipped node and operator policies, with the escrow bucket policy and a key policy,
// evaluated with their conditions on a table of requests. moto ignores conditions, so this
// is where the class, instance, TLS, write-once and SSE-KMS bindings are proved.
//
// Every case asserts that the simulator ignored no context key, and every deny has an
// allow beside it that differs in one value, so no deny passes for the wrong reason.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { defaultKeyPolicy, evaluate, loadPolicy } from './simulate.mjs';

const ACCOUNT = '111122223333';
const REGION = 'eu-west-1';
const BUCKET = 'acme-vault-resources';
const CLUSTER = 'prod-vault';
const ESCROW_KEY = `arn:aws:kms:${REGION}:${ACCOUNT}:key/11111111-2222-3333-4444-555555555555`;
const SEAL_KEY = `arn:aws:kms:${REGION}:${ACCOUNT}:key/66666666-7777-8888-9999-000000000000`;
const OTHER_KEY = `arn:aws:kms:${REGION}:${ACCOUNT}:key/99999999-8888-7777-6666-555555555555`;
const ESCROW = `arn:aws:s3:::${BUCKET}/vault-bootstrap/${CLUSTER}`;
const SNAPSHOTS = `arn:aws:s3:::${BUCKET}/vault-bootstrap-snapshots/${CLUSTER}`;
const ME = 'i-0aaaaaaaaaaaaaaaa';
const OTHER = 'i-0bbbbbbbbbbbbbbbb';
const instanceArn = (id) => `arn:aws:ec2:${REGION}:${ACCOUNT}:instance/${id}`;

const NODE = {
  principal: `arn:aws:sts::${ACCOUNT}:assumed-role/${CLUSTER}-node/${ME}`,
  identity: [{ name: 'node', policy: loadPolicy('packer/examples/iam-policy.json') }],
  // What AWS adds to a request signed with instance-profile credentials on that instance
  // (aws:PrincipalArn is the role's ARN for every session of it).
  context: {
    'aws:SecureTransport': 'true',
    'ec2:SourceInstanceARN': instanceArn(ME),
    'aws:PrincipalArn': `arn:aws:iam::${ACCOUNT}:role/${CLUSTER}-node`,
  },
};
const OPERATOR = {
  principal: `arn:aws:sts::${ACCOUNT}:assumed-role/${CLUSTER}-operator/alice`,
  identity: [{ name: 'operator', policy: loadPolicy('packer/examples/iam-policy-operator.json') }],
  context: { 'aws:SecureTransport': 'true', 'aws:PrincipalArn': `arn:aws:iam::${ACCOUNT}:role/${CLUSTER}-operator` },
};
const BUCKET_POLICY = loadPolicy('packer/examples/escrow-bucket-policy.json');
// The deploy module's key policies (deploy/terraform renders them; its test keeps these
// files equal): administration for the account, use only for the roles they name. A key
// the module did not make gets AWS's default policy, which leaves every decision to IAM.
const KEY_POLICIES = {
  [SEAL_KEY]: loadPolicy('packer/examples/kms-key-policy-seal.json'),
  [ESCROW_KEY]: loadPolicy('packer/examples/kms-key-policy-escrow.json'),
};
const DEFAULT_KEY_POLICY = defaultKeyPolicy(ACCOUNT);
// An account principal with every S3 action by IAM.
const S3_ADMIN = {
  principal: `arn:aws:sts::${ACCOUNT}:assumed-role/StorageAdmin/carol`,
  identity: [{ name: 's3admin', policy: { Version: '2012-10-17', Statement: [{ Effect: 'Allow', Action: 's3:*', Resource: '*' }] } }],
  context: { 'aws:SecureTransport': 'true', 'aws:PrincipalArn': `arn:aws:iam::${ACCOUNT}:role/StorageAdmin` },
};
// An account administrator: every KMS action on every key by IAM.
const ADMIN = {
  principal: `arn:aws:sts::${ACCOUNT}:assumed-role/Administrator/bob`,
  identity: [{ name: 'admin', policy: { Version: '2012-10-17', Statement: [{ Effect: 'Allow', Action: 'kms:*', Resource: '*' }] } }],
  context: { 'aws:SecureTransport': 'true', 'aws:PrincipalArn': `arn:aws:iam::${ACCOUNT}:role/Administrator` },
};

const ec = (cls, extra = {}) => ({
  'kms:EncryptionContext:vault-bootstrap:cluster': CLUSTER,
  'kms:EncryptionContext:vault-bootstrap:class': cls,
  ...extra,
});

async function decide(who, action, resource, context = {}) {
  const isKms = action.startsWith('kms:');
  const r = await evaluate({
    principal: who.principal,
    action,
    resource,
    account: ACCOUNT,
    context: { ...who.context, ...context },
    identity: who.identity,
    resourcePolicy: isKms ? (KEY_POLICIES[resource] ?? DEFAULT_KEY_POLICY) : BUCKET_POLICY,
  });
  assert.deepEqual(r.ignored, [], `${action} on ${resource}: the simulator ignored context keys`);
  return r.decision;
}

// [name, who, action, resource, context, expected]
const ALLOWED = 'Allowed';
const DENIED = ['ImplicitlyDenied', 'ExplicitlyDenied'];
const EXPLICIT = ['ExplicitlyDenied'];
// A put the agent makes to the escrow: write-once, SSE-KMS under the escrow key's ARN.
const goodPut = {
  's3:if-none-match': '*',
  's3:x-amz-server-side-encryption': 'aws:kms',
  's3:x-amz-server-side-encryption-aws-kms-key-id': ESCROW_KEY,
};
const withoutKey = (k) => Object.fromEntries(Object.entries(goodPut).filter(([key]) => key !== k));

const CASES = [
  // --- KMS, escrow key: what a node may decrypt.
  ['node decrypts a node credential of its cluster', NODE, 'kms:Decrypt', ESCROW_KEY, ec('node-credential'), ALLOWED],
  ['node cannot decrypt a recovery item', NODE, 'kms:Decrypt', ESCROW_KEY, ec('recovery'), DENIED],
  ['node cannot decrypt a node credential of another cluster', NODE, 'kms:Decrypt', ESCROW_KEY,
    { ...ec('node-credential'), 'kms:EncryptionContext:vault-bootstrap:cluster': 'other-vault' }, DENIED],
  ['node decrypts its own pending init file', NODE, 'kms:Decrypt', ESCROW_KEY,
    ec('pending', { 'kms:EncryptionContext:vault-bootstrap:instance': instanceArn(ME) }), ALLOWED],
  ["node cannot decrypt another instance's pending init file", NODE, 'kms:Decrypt', ESCROW_KEY,
    ec('pending', { 'kms:EncryptionContext:vault-bootstrap:instance': instanceArn(OTHER) }), DENIED],
  ['node cannot decrypt its pending file from off the instance (no ec2:SourceInstanceARN)',
    { ...NODE, context: { 'aws:SecureTransport': 'true' } }, 'kms:Decrypt', ESCROW_KEY,
    ec('pending', { 'kms:EncryptionContext:vault-bootstrap:instance': instanceArn(ME) }), DENIED],
  ['node cannot decrypt without an encryption context', NODE, 'kms:Decrypt', ESCROW_KEY, {}, DENIED],
  ['node encrypts for its cluster', NODE, 'kms:Encrypt', ESCROW_KEY, ec('recovery'), ALLOWED],
  ['node cannot encrypt for another cluster', NODE, 'kms:Encrypt', ESCROW_KEY,
    { ...ec('recovery'), 'kms:EncryptionContext:vault-bootstrap:cluster': 'other-vault' }, DENIED],
  ['node makes a data key for its cluster', NODE, 'kms:GenerateDataKey', ESCROW_KEY, ec('pending'), ALLOWED],
  ['node cannot re-encrypt a recovery item to a key it can open', NODE, 'kms:ReEncryptFrom', ESCROW_KEY, ec('recovery'), DENIED],
  ['node cannot re-encrypt to the escrow key', NODE, 'kms:ReEncryptTo', ESCROW_KEY, ec('recovery'), DENIED],
  ['node cannot grant itself the escrow key', NODE, 'kms:CreateGrant', ESCROW_KEY, ec('recovery'), DENIED],
  // --- KMS, seal key: the server needs it, with no condition (a root shell uses it too).
  ['node uses the seal key to unseal', NODE, 'kms:Decrypt', SEAL_KEY, {}, ALLOWED],
  // The key policies: use is for the roles they name, never delegated to the account's IAM.
  ['an account administrator cannot decrypt a recovery item (the escrow key policy grants IAM no use)', ADMIN, 'kms:Decrypt', ESCROW_KEY, ec('recovery'), DENIED],
  ['an account administrator cannot use the seal key', ADMIN, 'kms:Decrypt', SEAL_KEY, {}, DENIED],
  ['an account administrator still administers the escrow key', ADMIN, 'kms:DescribeKey', ESCROW_KEY, {}, ALLOWED],
  ['an account administrator cannot grant itself use of the escrow key', ADMIN, 'kms:CreateGrant', ESCROW_KEY, {}, DENIED],
  ['operator cannot use the seal key', OPERATOR, 'kms:Decrypt', SEAL_KEY, {}, DENIED],
  ['a key the module did not make is left to IAM (positive control of the default policy)', ADMIN, 'kms:Decrypt', OTHER_KEY, {}, ALLOWED],
  ['node cannot decrypt under another key', NODE, 'kms:Decrypt', OTHER_KEY, ec('node-credential'), DENIED],
  // --- KMS, operator.
  ['operator decrypts a recovery item of its cluster', OPERATOR, 'kms:Decrypt', ESCROW_KEY, ec('recovery'), ALLOWED],
  ['operator cannot decrypt a recovery item of another cluster', OPERATOR, 'kms:Decrypt', ESCROW_KEY,
    { ...ec('recovery'), 'kms:EncryptionContext:vault-bootstrap:cluster': 'other-vault' }, DENIED],
  ['operator decrypts a pending init copy of any instance of its cluster', OPERATOR, 'kms:Decrypt', ESCROW_KEY,
    ec('pending', { 'kms:EncryptionContext:vault-bootstrap:instance': instanceArn(OTHER) }), ALLOWED],
  // Finishing an escrow whose initializer is gone (`escrow finish`) encrypts its items.
  ['operator encrypts an escrow item for its cluster', OPERATOR, 'kms:Encrypt', ESCROW_KEY, ec('recovery'), ALLOWED],
  ['operator cannot encrypt for another cluster', OPERATOR, 'kms:Encrypt', ESCROW_KEY,
    { ...ec('recovery'), 'kms:EncryptionContext:vault-bootstrap:cluster': 'other-vault' }, DENIED],
  ['operator cannot encrypt without an encryption context', OPERATOR, 'kms:Encrypt', ESCROW_KEY, {}, DENIED],

  // --- S3, escrow objects: write-once, TLS, SSE-KMS under the escrow key.
  ['node writes an escrow item once, under the escrow key', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`, goodPut, ALLOWED],
  ['node cannot overwrite an escrow item (no If-None-Match)', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    withoutKey('s3:if-none-match'), EXPLICIT],
  ['a write without TLS is denied', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    { ...goodPut, 'aws:SecureTransport': 'false' }, EXPLICIT],
  ['a write without SSE is denied', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    withoutKey('s3:x-amz-server-side-encryption'), EXPLICIT],
  ['a write with SSE-S3 instead of SSE-KMS is denied', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    { ...goodPut, 's3:x-amz-server-side-encryption': 'AES256' }, EXPLICIT],
  ['a write under another key, by ARN, is denied', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    { ...goodPut, 's3:x-amz-server-side-encryption-aws-kms-key-id': OTHER_KEY }, EXPLICIT],
  // The agent resolves its alias to the key's ARN before it puts (DescribeKey), so only the
  // ARN passes; an alias or a bare id is not an ARN and must not slip past the deny.
  ['a write under another key, by alias, is denied', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    { ...goodPut, 's3:x-amz-server-side-encryption-aws-kms-key-id': 'alias/somebody-elses' }, EXPLICIT],
  ['a write under another key, by bare key id, is denied', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    { ...goodPut, 's3:x-amz-server-side-encryption-aws-kms-key-id': '99999999-8888-7777-6666-555555555555' }, EXPLICIT],
  ['a write without naming a key (the bucket default) is denied', NODE, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    withoutKey('s3:x-amz-server-side-encryption-aws-kms-key-id'), EXPLICIT],
  ['node reads back an escrow item (ciphertext)', NODE, 's3:GetObject', `${ESCROW}/recovery-key-1.enc`, {}, ALLOWED],
  ['node cannot delete an escrow item', NODE, 's3:DeleteObject', `${ESCROW}/recovery-key-1.enc`, {}, DENIED],
  ['node cannot delete an escrow item version', NODE, 's3:DeleteObjectVersion', `${ESCROW}/recovery-key-1.enc`, {}, DENIED],
  ['operator cannot delete an escrow item', OPERATOR, 's3:DeleteObject', `${ESCROW}/recovery-key-1.enc`, {}, DENIED],
  ['operator writes a missing escrow item once, under the escrow key', OPERATOR, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`, goodPut, ALLOWED],
  ['operator cannot overwrite an escrow item (no If-None-Match)', OPERATOR, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`,
    withoutKey('s3:if-none-match'), EXPLICIT],
  ['operator cannot write the escrow of another cluster', OPERATOR, 's3:PutObject',
    `arn:aws:s3:::${BUCKET}/vault-bootstrap/other-vault/recovery-key-1.enc`, goodPut, DENIED],
  // The initializer's copy of its init response: written once by it, read by the operator
  // alone, so node credentials taken off an instance cannot fetch it.
  ['node writes its pending init copy once, under the escrow key', NODE, 's3:PutObject', `${ESCROW}/pending-init/${ME}.json`, goodPut, ALLOWED],
  ['node cannot overwrite a pending init copy', NODE, 's3:PutObject', `${ESCROW}/pending-init/${ME}.json`,
    withoutKey('s3:if-none-match'), EXPLICIT],
  ['node cannot read a pending init copy, even its own', NODE, 's3:GetObject', `${ESCROW}/pending-init/${ME}.json`, {}, EXPLICIT],
  ['operator reads a pending init copy', OPERATOR, 's3:GetObject', `${ESCROW}/pending-init/${OTHER}.json`, {}, ALLOWED],
  ['operator reads an escrow item', OPERATOR, 's3:GetObject', `${ESCROW}/recovery-key-1.enc`, {}, ALLOWED],
  // A rotation's generations are the operator's alone: a node that could write one could
  // plant shares of the key in force (it can split the key it unwraps) and make a rotation
  // that changes nothing look done, or name a generation nobody can use.
  ['node cannot write a rotation generation, even once under the escrow key', NODE, 's3:PutObject',
    `${ESCROW}/generations/2/recovery-key-1.enc`, goodPut, EXPLICIT],
  ['node cannot write a generation record', NODE, 's3:PutObject', `${ESCROW}/generations/2/rotated.json`, goodPut, EXPLICIT],
  ['node reads a generation (its credentials live there after a rotation)', NODE, 's3:GetObject',
    `${ESCROW}/generations/2/snapshot-approle.enc`, {}, ALLOWED],
  ['operator writes a rotation generation once, under the escrow key', OPERATOR, 's3:PutObject',
    `${ESCROW}/generations/2/recovery-key-1.enc`, goodPut, ALLOWED],
  ['operator cannot overwrite a rotation generation', OPERATOR, 's3:PutObject', `${ESCROW}/generations/2/rotated.json`,
    withoutKey('s3:if-none-match'), EXPLICIT],

  // --- S3, snapshots: a node writes and prunes them; only the operator reads them back
  // (restore is an operator action), so node credentials taken off an instance cannot
  // download the cluster's data.
  ['node writes a snapshot', NODE, 's3:PutObject', `${SNAPSHOTS}/2026/12/07/snap.snap`, {}, ALLOWED],
  ['node cannot read a snapshot', NODE, 's3:GetObject', `${SNAPSHOTS}/2026/12/07/snap.snap`, {}, DENIED],
  ['node prunes an old snapshot', NODE, 's3:DeleteObject', `${SNAPSHOTS}/2026/12/07/snap.snap`, {}, ALLOWED],
  ['operator reads a snapshot', OPERATOR, 's3:GetObject', `${SNAPSHOTS}/2026/12/07/snap.snap`, {}, ALLOWED],

  // --- S3, the rest of the node's reads.
  ['node reads the TLS material', NODE, 's3:GetObject', `arn:aws:s3:::${BUCKET}/tls/server.key`, {}, ALLOWED],
  // The server's private key is the nodes' alone, whatever IAM grants elsewhere.
  ['an S3 administrator cannot read the TLS private key', S3_ADMIN, 's3:GetObject', `arn:aws:s3:::${BUCKET}/tls/server.key`, {}, EXPLICIT],
  ['an S3 administrator reads a PGP public key (positive control)', S3_ADMIN, 's3:GetObject', `arn:aws:s3:::${BUCKET}/pgp/alice.asc`, {}, ALLOWED],
  ["node cannot read another cluster's escrow", NODE, 's3:GetObject', `arn:aws:s3:::${BUCKET}/vault-bootstrap/other-vault/recovery-key-1.enc`, {}, DENIED],
  ['node lists its escrow prefix', NODE, 's3:ListBucket', `arn:aws:s3:::${BUCKET}`, { 's3:prefix': `vault-bootstrap/${CLUSTER}/` }, ALLOWED],
  ['node cannot list the whole bucket', NODE, 's3:ListBucket', `arn:aws:s3:::${BUCKET}`, { 's3:prefix': '' }, DENIED],
  ['a listing without TLS is denied', NODE, 's3:ListBucket', `arn:aws:s3:::${BUCKET}`,
    { 's3:prefix': `vault-bootstrap/${CLUSTER}/`, 'aws:SecureTransport': 'false' }, EXPLICIT],
];

// --- The data-perimeter variant: the node policy plus iam-policy-data-perimeter.json. The
// instance's credentials reach the seal key, the escrow key and the escrow and snapshot
// objects only from that instance, through a VPC endpoint of its own VPC; taken off the
// instance they do not, even from inside the VPC. Calls S3 makes for SSE-KMS stay allowed.
const PERIMETER = {
  principal: NODE.principal,
  identity: [...NODE.identity, { name: 'perimeter', policy: loadPolicy('packer/examples/iam-policy-data-perimeter.json') }],
  context: {
    ...NODE.context,
    'aws:Ec2InstanceSourceVpc': 'vpc-0cluster',
    'aws:Ec2InstanceSourcePrivateIPv4': '10.0.1.5',
    'aws:ViaAWSService': 'false',
  },
};
const onInstance = { 'aws:SourceVpc': 'vpc-0cluster', 'aws:VpcSourceIp': '10.0.1.5' };
const SEAL_DECRYPT = ['kms:Decrypt', SEAL_KEY];
CASES.push(
  ['perimeter: the seal key from the instance, through its VPC endpoint', PERIMETER, ...SEAL_DECRYPT, onInstance, ALLOWED],
  ['perimeter: a node credential from the instance', PERIMETER, 'kms:Decrypt', ESCROW_KEY, { ...ec('node-credential'), ...onInstance }, ALLOWED],
  ['perimeter: an escrow write from the instance', PERIMETER, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`, { ...goodPut, ...onInstance }, ALLOWED],
  ['perimeter: the seal key through a public endpoint is denied', PERIMETER, ...SEAL_DECRYPT, {}, EXPLICIT],
  ['perimeter: the seal key from another VPC is denied', PERIMETER, ...SEAL_DECRYPT, { ...onInstance, 'aws:SourceVpc': 'vpc-0elsewhere' }, EXPLICIT],
  ['perimeter: the seal key from another address in the VPC is denied', PERIMETER, ...SEAL_DECRYPT, { ...onInstance, 'aws:VpcSourceIp': '10.0.1.9' }, EXPLICIT],
  ['perimeter: a node credential off the instance is denied', PERIMETER, 'kms:Decrypt', ESCROW_KEY, ec('node-credential'), EXPLICIT],
  ['perimeter: an escrow write off the instance is denied', PERIMETER, 's3:PutObject', `${ESCROW}/recovery-key-1.enc`, goodPut, EXPLICIT],
  ["perimeter: S3's own SSE-KMS call for the node stays allowed", PERIMETER, 'kms:GenerateDataKey', ESCROW_KEY,
    { 'aws:ViaAWSService': 'true', 'kms:ViaService': `s3.${REGION}.amazonaws.com`, 'kms:EncryptionContext:aws:s3:arn': `${ESCROW}/recovery-key-1.enc` }, ALLOWED],
  ['perimeter: peers are still discovered through a public endpoint', PERIMETER, 'ec2:DescribeInstances', '*', {}, ALLOWED],
);

for (const [name, who, action, resource, context, expected] of CASES) {
  test(name, async () => {
    const got = await decide(who, action, resource, context);
    if (expected === ALLOWED) assert.equal(got, ALLOWED, name);
    else assert.ok(expected.includes(got), `${name}: expected one of ${expected}, got ${got}`);
  });
}

test('the table holds allowed and denied cases for each role (positive controls)', () => {
  for (const who of [NODE, OPERATOR]) {
    const mine = CASES.filter((c) => c[1] === who || c[1].principal === who.principal);
    assert.ok(mine.some((c) => c[5] === ALLOWED), 'an allowed case');
    assert.ok(mine.some((c) => c[5] !== ALLOWED), 'a denied case');
  }
});
