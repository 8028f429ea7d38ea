#!/usr/bin/env python3
"""The fleet tier's AWS side, in moto, on the fleet's bridge (tests/fleet/fleet.sh runs it
inside the fleet's network namespace).

It reuses tests/testbed/seed.py's pieces with the fleet's addresses: a VPC 198.18.0.0/16
(the benchmark range: never anyone's real network), a subnet 198.18.B.0/24, instances at
198.18.B.11, .12, ... tagged as one Auto Scaling group, the KMS keys, the bucket with a CA
and a server certificate that covers the hosts' addresses and the cluster's server name.

  up            --dir DIR --block 198.18.B --nodes N: the state above; DIR/env.json
  add-instance  --dir DIR --ip IP: one more instance of the group; prints its id
  terminate     --dir DIR --id ID: what the ASG does to a dead instance
  tls-rotate    --dir DIR: a new good server certificate (same CA) in the bucket; prints
                its serial number in hex
  objects       --dir DIR --prefix P: the keys under P in the bucket, one a line
  lock-holder   --dir DIR --cluster NAME: the instance id in the newest init-lock generation
                (nothing when no lock exists yet)
  serial        --dir DIR --ip IP: the serial number (hex) of the certificate IP:8200 serves
  secrets       --dir DIR --cluster NAME: decrypts every escrowed item through KMS (with the
                encryption context the agent uses) and prints them as JSON on stdout, for the
                test to search hosts for. Never printed anywhere else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testbed"))
import seed  # noqa: E402  (tests/testbed/seed.py)

VPC_CIDR = "198.18.0.0/16"


def clients(env: dict):
    ns = argparse.Namespace(moto=env["moto"], region=env["region"])
    return (lambda svc: seed.client(svc, ns))


def load(d: Path) -> dict:
    return json.loads((d / "env.json").read_text())


def save(d: Path, env: dict) -> None:
    seed.write_file(d / "env.json", (json.dumps(env, indent=2) + "\n").encode())


def cmd_up(a) -> int:
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    env = {"moto": a.moto, "region": a.region, "bucket": a.bucket, "asg": a.asg,
           "block": a.block, "server_name": a.server_name, "instances": []}
    client = clients(env)
    seed.VPC_CIDR = VPC_CIDR  # seed.find_vpc/ensure_vpc read it
    ec2 = client("ec2")
    vpc = seed.ensure_vpc(ec2)
    az = f"{a.region}a"
    subnet = seed.ensure_subnet(ec2, vpc, f"{a.block}.0/24", az)
    ami = seed.pick_ami(ec2)
    for i in range(a.nodes):
        ip = f"{a.block}.{11 + i}"
        env["instances"].append({"id": seed.run_instance(ec2, ami, subnet, ip, a.asg, f"vault-{i}"), "ip": ip})
    kms = client("kms")
    env["kms_unseal_key_id"] = seed.ensure_kms_alias(kms, "alias/vault-unseal", "fleet unseal key")
    env["kms_escrow_key_id"] = seed.ensure_kms_alias(kms, "alias/vault-escrow", "fleet escrow key")
    s3 = client("s3")
    seed.ensure_bucket(s3, a.bucket, a.region)
    ca_key, ca_cert = seed.make_ca("ec")
    key, cert = seed.good_server(ca_key, ca_cert, "ec", a.block, a.server_name)
    seed.upload_tls(s3, a.bucket, seed.cert_pem(cert), seed.key_pem(key), seed.cert_pem(ca_cert))
    # The test searches the hosts for the server key's lines outside its own file.
    seed.write_file(d / "server.key", seed.key_pem(key), 0o600)
    seed.write_file(d / "ca.pem", seed.cert_pem(ca_cert))
    seed.write_file(d / "ca.key", seed.key_pem(ca_key), 0o600)
    # The operators' CA (access.operator_ca_key in user-data) and one operator's client
    # certificate, for the test's own logins (cert auth, role "operators").
    op_key, op_ca = seed.make_ca("ec", "fleet operators CA")
    s3.put_object(Bucket=a.bucket, Key="tls/operator-ca.pem", Body=seed.cert_pem(op_ca))
    alice = seed.new_key("ec")
    alice_cert = seed.make_server_cert(op_key, op_ca, alice, [seed.x509.DNSName("alice")], "alice",
                                       seed.now() - seed.dt.timedelta(hours=1),
                                       seed.now() + seed.dt.timedelta(days=1))
    seed.write_file(d / "operator.pem", seed.cert_pem(alice_cert))
    seed.write_file(d / "operator.key", seed.key_pem(alice), 0o600)
    env.update(vpc_id=vpc, subnet_id=subnet, ami=ami, availability_zone=az,
               server_serial=format(cert.serial_number, "x"))
    save(d, env)
    print(d / "env.json", flush=True)
    return 0


def cmd_add_instance(a) -> int:
    d = Path(a.dir)
    env = load(d)
    ec2 = clients(env)("ec2")
    n = len(env["instances"])
    iid = seed.run_instance(ec2, env["ami"], env["subnet_id"], a.ip, env["asg"], f"vault-{n}")
    env["instances"].append({"id": iid, "ip": a.ip})
    save(d, env)
    print(iid, flush=True)
    return 0


def cmd_terminate(a) -> int:
    env = load(Path(a.dir))
    ec2 = clients(env)("ec2")
    for t in ec2.terminate_instances(InstanceIds=[a.id])["TerminatingInstances"]:
        print(t["InstanceId"], t["CurrentState"]["Name"], flush=True)
    return 0


def cmd_tls_rotate(a) -> int:
    d = Path(a.dir)
    env = load(d)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    ca_pem = (d / "ca.pem").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    key, cert = seed.good_server(ca_key, ca_cert, "ec", env["block"], env["server_name"])
    seed.upload_tls(clients(env)("s3"), env["bucket"], seed.cert_pem(cert), seed.key_pem(key), ca_pem)
    old = d / "server.key"
    if old.exists():
        old.rename(d / f"server.key.{env.get('server_serial', 'old')}")
    seed.write_file(d / "server.key", seed.key_pem(key), 0o600)
    env["server_serial"] = format(cert.serial_number, "x")
    save(d, env)
    print(env["server_serial"], flush=True)
    return 0


def cmd_objects(a) -> int:
    env = load(Path(a.dir))
    s3 = clients(env)("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env["bucket"], Prefix=a.prefix):
        for o in page.get("Contents", []):
            print(o["Key"])
    return 0


def cmd_lock_holder(a) -> int:
    env = load(Path(a.dir))
    s3 = clients(env)("s3")
    prefix = f"vault-bootstrap/{a.cluster}/init-lock/"
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env["bucket"], Prefix=prefix)
            for o in page.get("Contents", [])]
    if keys:
        # <generation>.json: the highest generation holds the lock.
        newest = max(keys, key=lambda k: int(k[len(prefix):].split(".")[0]))
        body = json.loads(s3.get_object(Bucket=env["bucket"], Key=newest)["Body"].read())
        print(body["instance_id"], flush=True)
    return 0


def cmd_serial(a) -> int:
    import ssl
    from cryptography import x509
    pem = ssl.get_server_certificate((a.ip, 8200), timeout=5)
    print(format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x"), flush=True)
    return 0


def cmd_secrets(a) -> int:
    """Every escrowed item, decrypted, as the agent's README tells a key holder to."""
    env = load(Path(a.dir))
    client = clients(env)
    s3, kms = client("s3"), client("kms")
    prefix = f"vault-bootstrap/{a.cluster}/"
    out: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env["bucket"], Prefix=prefix):
        for o in page.get("Contents", []):
            name = o["Key"][len(prefix):]
            if not name.endswith(".enc") or "/" in name:
                continue
            item = name[: -len(".enc")]
            # The object is the KMS ciphertext blob itself (src/escrow/mod.rs put_item).
            blob = s3.get_object(Bucket=env["bucket"], Key=o["Key"])["Body"].read()
            # The context the agent encrypts with (src/escrow/mod.rs Layout::context): the
            # snapshot and lifecycle AppRoles are the nodes' own credentials, everything
            # else recovery.
            klass = "node-credential" if item.endswith("-approle") else "recovery"
            plain = kms.decrypt(CiphertextBlob=blob, EncryptionContext={
                "vault-bootstrap:cluster": a.cluster, "vault-bootstrap:item": item,
                "vault-bootstrap:class": klass,
            })["Plaintext"]
            out[item] = plain.decode()
    json.dump(out, sys.stdout)
    print(flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moto", default=None, help="moto endpoint (up only; later commands read env.json)")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--dir", required=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--block", required=True, help="198.18.B")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--asg", default="fleet-vault")
    up.add_argument("--bucket", default="fleet-vault-resources")
    up.add_argument("--server-name", default="vault.fleet.internal")
    up.set_defaults(func=cmd_up)
    add = sub.add_parser("add-instance")
    add.add_argument("--ip", required=True)
    add.set_defaults(func=cmd_add_instance)
    term = sub.add_parser("terminate")
    term.add_argument("--id", required=True)
    term.set_defaults(func=cmd_terminate)
    rot = sub.add_parser("tls-rotate")
    rot.set_defaults(func=cmd_tls_rotate)
    obj = sub.add_parser("objects")
    obj.add_argument("--prefix", required=True)
    obj.set_defaults(func=cmd_objects)
    lock = sub.add_parser("lock-holder")
    lock.add_argument("--cluster", required=True)
    lock.set_defaults(func=cmd_lock_holder)
    ser = sub.add_parser("serial")
    ser.add_argument("--ip", required=True)
    ser.set_defaults(func=cmd_serial)
    sec = sub.add_parser("secrets")
    sec.add_argument("--cluster", required=True)
    sec.set_defaults(func=cmd_secrets)
    a = p.parse_args()
    if a.cmd == "up":
        if not a.moto:
            p.error("up needs --moto")
        if not a.block.startswith("198.18.") or not 1 <= a.nodes <= 29:
            p.error("--block must be 198.18.B and --nodes 1..29")
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
