// The encryption-context shim in simulate.mjs: the simulator's gap it works around, and the
// controls that show the rename changes nothing else.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { conditionKeys, defaultKeyPolicy, evaluate, loadPolicy, shim, shimContext } from './simulate.mjs';

const ACCOUNT = '111122223333';
const KEY = 'arn:aws:kms:eu-west-1:111122223333:key/11111111-2222-3333-4444-555555555555';
const PRINCIPAL = 'arn:aws:sts::111122223333:assumed-role/prod-vault-node/i-0aaaaaaaaaaaaaaaa';
const SHIPPED = [
  'packer/examples/iam-policy.json',
  'packer/examples/iam-policy-operator.json',
  'packer/examples/escrow-bucket-policy.json',
  'packer/examples/iam-policy-data-perimeter.json',
];

const policy = (condition) => ({
  Version: '2012-10-17',
  Statement: [{ Effect: 'Allow', Action: 'kms:Decrypt', Resource: KEY, Condition: condition }],
});
const run = (p, context, opts) =>
  evaluate({ principal: PRINCIPAL, action: 'kms:Decrypt', resource: KEY, account: ACCOUNT, context, identity: [{ name: 'p', policy: p }], resourcePolicy: defaultKeyPolicy(ACCOUNT) }, opts);

test('without the shim the simulator ignores kms:EncryptionContext:<k> (the gap it works around)', async () => {
  const p = policy({ StringEquals: { 'kms:EncryptionContext:vault-bootstrap:class': 'node-credential' } });
  const r = await run(p, { 'kms:EncryptionContext:vault-bootstrap:class': 'node-credential' }, { raw: true });
  // If a later release evaluates these keys, this fails: then the shim can go.
  assert.deepEqual(r.ignored, ['kms:EncryptionContext:vault-bootstrap:class']);
  assert.equal(r.decision, 'ImplicitlyDenied', 'a matching context is not even allowed');
});

test('with the shim, a pair differing only in one context value is allowed and denied', async () => {
  const p = policy({ StringEquals: { 'kms:EncryptionContext:vault-bootstrap:class': 'node-credential' } });
  const yes = await run(p, { 'kms:EncryptionContext:vault-bootstrap:class': 'node-credential' });
  const no = await run(p, { 'kms:EncryptionContext:vault-bootstrap:class': 'recovery' });
  assert.deepEqual([yes.ignored, no.ignored], [[], []]);
  assert.equal(yes.decision, 'Allowed');
  assert.equal(no.decision, 'ImplicitlyDenied');
});

test('with the shim, a policy variable in a context condition is evaluated', async () => {
  const p = policy({ StringEquals: { 'kms:EncryptionContext:vault-bootstrap:instance': '${ec2:SourceInstanceARN}' } });
  const mine = 'arn:aws:ec2:eu-west-1:111122223333:instance/i-0aaaaaaaaaaaaaaaa';
  const other = 'arn:aws:ec2:eu-west-1:111122223333:instance/i-0bbbbbbbbbbbbbbbb';
  const yes = await run(p, { 'ec2:SourceInstanceARN': mine, 'kms:EncryptionContext:vault-bootstrap:instance': mine });
  const no = await run(p, { 'ec2:SourceInstanceARN': mine, 'kms:EncryptionContext:vault-bootstrap:instance': other });
  assert.deepEqual([yes.decision, no.decision], ['Allowed', 'ImplicitlyDenied']);
  assert.deepEqual([yes.ignored, no.ignored], [[], []]);
});

test('keys with colons after the prefix (aws:s3:arn) are renamed whole', () => {
  const p = policy({ StringLike: { 'kms:EncryptionContext:aws:s3:arn': 'arn:aws:s3:::b/*' } });
  assert.deepEqual(conditionKeys(shim(p)), ['aws:RequestTag/aws:s3:arn']);
  assert.deepEqual(Object.keys(shimContext({ 'kms:EncryptionContext:aws:s3:arn': 'x', 'aws:SecureTransport': 'true' })), [
    'aws:RequestTag/aws:s3:arn',
    'aws:SecureTransport',
  ]);
});

test('the shim refuses a policy that already uses aws:RequestTag/', () => {
  const p = policy({ StringEquals: { 'aws:RequestTag/team': 'a', 'kms:EncryptionContext:team': 'b' } });
  assert.throws(() => shim(p), /already uses aws:RequestTag\//);
  for (const rel of SHIPPED) shim(loadPolicy(rel)); // the shipped ones are accepted
});

test('the shim changes nothing in a policy without encryption-context keys', () => {
  for (const rel of SHIPPED) {
    const p = loadPolicy(rel);
    const uses = JSON.stringify(p).includes('kms:EncryptionContext:');
    if (!uses) assert.deepEqual(shim(p), p, rel);
  }
  const bucket = loadPolicy('packer/examples/escrow-bucket-policy.json');
  assert.deepEqual(shim(bucket), bucket);
});

test('no decision changes for requests without an encryption context', async () => {
  const node = loadPolicy('packer/examples/iam-policy.json');
  const requests = [
    ['kms:Decrypt', KEY, {}],
    ['kms:Encrypt', 'arn:aws:kms:eu-west-1:111122223333:key/66666666-7777-8888-9999-000000000000', {}],
    ['s3:GetObject', 'arn:aws:s3:::acme-vault-resources/tls/server.crt', {}],
    ['s3:PutObject', 'arn:aws:s3:::acme-vault-resources/vault-bootstrap/prod-vault/x.enc', {}],
    ['ec2:DescribeInstances', '*', {}],
  ];
  for (const [action, resource, context] of requests) {
    const args = { principal: PRINCIPAL, action, resource, account: ACCOUNT, context, identity: [{ name: 'node', policy: node }], resourcePolicy: action.startsWith('kms:') ? defaultKeyPolicy(ACCOUNT) : undefined };
    const raw = await evaluate(args, { raw: true });
    const shimmed = await evaluate(args);
    assert.equal(shimmed.decision, raw.decision, `${action} ${resource}`);
  }
});
