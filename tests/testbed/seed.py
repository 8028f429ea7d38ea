#!/usr/bin/env python3
"""Seed a running moto server with the AWS state of one simulated vault-bootstrap cluster.

Part of the local AWS test-bed for ``vault-bootstrap``.  The agent discovers its peers
through EC2 tags, unseals through KMS and fetches its TLS material from S3; this script
creates exactly that state in a moto server (``moto_server -H 127.0.0.1 -p PORT``), so
that a test can then start one IMDS fake (imds.py) and one agent per node IP.

Sub-commands:

  up            VPC 127.0.0.0/16 + subnet <block>.0/24, --nodes instances at
                <block>.11, .12, ... tagged aws:autoscaling:groupName=<asg> and
                Name=vault-<i>; KMS keys alias/vault-unseal and alias/vault-escrow;
                S3 bucket with tls/server.pem, tls/server.key, tls/ca.pem (CA and server
                certificate generated here).  Writes DIR/env.json, DIR/ca.pem, DIR/ca.key,
                DIR/server.pem, DIR/server.key and prints the path of env.json.
  tls           Re-upload the TLS objects as a (deliberately bad) variant for negative
                tests, signed with DIR/ca.key: good, expired, notyet, mismatch, wrong-ca,
                san, malformed-cert, malformed-key, missing-key.  new-ca rotates the CA:
                a new CA and a server certificate it signed are uploaded, DIR/ca.pem and
                DIR/ca.key become the new CA's, the old CA is kept as DIR/ca-old.pem.
  add-instance  Run one more instance (same tags) at a given IP; prints its id.
  terminate     Terminate one instance; prints its id and new state.
  iam           Create the identities of a test-bed whose moto enforces IAM (run after
                `up`, while moto does not check yet): an `admin` user allowed everything
                (the harness, seed.py and imds.py use its keys from then on), the node role
                `vault-node` whose role policy is the shipped node policy adapted to the
                test-bed's names, assumed once per instance (session name = instance id), a
                `vault-seal` user for the servers' awskms seal (the node policy's seal
                statement), and an `operator` user with the shipped operator policy.
                Writes DIR/iam.json (every key) and DIR/imds-credentials.json (each
                instance's role session, by IP, for imds.py --credentials); --enforce then
                turns moto's checks on (POST /moto-api/reset-auth 0).

Only talks to the given --moto endpoint (loopback), with static dummy credentials, or with
the keys in --moto-keys (a JSON file {"AccessKeyId": ..., "SecretAccessKey": ...}) once moto
enforces IAM and refuses the dummy ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VPC_CIDR = "127.0.0.0/16"
FALLBACK_AMIS = ("ami-12c6146b", "ami-03cf127a", "ami-760aaa0f")
INSTANCE_TYPE = "t3.micro"
TLS_KEYS = ("tls/server.pem", "tls/server.key", "tls/ca.pem")
MALFORMED_CERT = "-----BEGIN CERTIFICATE-----\nnot base64!!\n-----END CERTIFICATE-----\n"
MALFORMED_KEY = "-----BEGIN PRIVATE KEY-----\nthis is !! not a key ~~ garbage\n-----END PRIVATE KEY-----\n"
VARIANTS = (
    "good", "expired", "notyet", "mismatch", "wrong-ca", "san",
    "malformed-cert", "malformed-key", "missing-key", "new-ca",
)


def log(msg: str) -> None:
    print(f"seed: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- AWS clients

def moto_keys(args: argparse.Namespace) -> tuple[str, str]:
    """The keys to sign with: --moto-keys when given (moto enforcing IAM), else dummy ones."""
    path = getattr(args, "moto_keys", None)
    if not path:
        return "testing", "testing"
    k = json.loads(Path(path).read_text())
    return k["AccessKeyId"], k["SecretAccessKey"]


def client(service: str, args: argparse.Namespace, keys: tuple[str, str] | None = None,
           token: str | None = None):
    """A boto3 client for moto with static dummy credentials (or --moto-keys, or `keys`)."""
    ak, sk = keys or moto_keys(args)
    return boto3.session.Session(
        aws_access_key_id=ak,
        aws_secret_access_key=sk,
        aws_session_token=token,
        region_name=args.region,
    ).client(
        service,
        endpoint_url=args.moto,
        config=Config(
            # moto's first EC2 call loads its AMI catalogue (~6 s): be patient, but do
            # not retry 500s (moto answers 500 for e.g. an IP already in use).
            connect_timeout=5,
            read_timeout=120,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


def ec2_filter(name: str, *values: str) -> dict:
    return {"Name": name, "Values": list(values)}


def find_vpc(ec2) -> str | None:
    vpcs = ec2.describe_vpcs(Filters=[ec2_filter("cidr-block", VPC_CIDR)])["Vpcs"]
    # moto versions differ in filter support: double-check the CIDR ourselves.
    vpcs = [v for v in vpcs if v.get("CidrBlock") == VPC_CIDR]
    return vpcs[0]["VpcId"] if vpcs else None


def ensure_vpc(ec2) -> str:
    vpc_id = find_vpc(ec2)
    if vpc_id:
        log(f"reusing VPC {vpc_id} ({VPC_CIDR})")
        return vpc_id
    vpc_id = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
    log(f"created VPC {vpc_id} ({VPC_CIDR})")
    return vpc_id


def ensure_subnet(ec2, vpc_id: str, cidr: str, az: str) -> str:
    subnets = ec2.describe_subnets(Filters=[ec2_filter("vpc-id", vpc_id)])["Subnets"]
    for s in subnets:
        if s.get("CidrBlock") == cidr:
            log(f"reusing subnet {s['SubnetId']} ({cidr})")
            return s["SubnetId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=az)["Subnet"]["SubnetId"]
    log(f"created subnet {subnet_id} ({cidr}, {az})")
    return subnet_id


def pick_ami(ec2) -> str:
    """An AMI id moto knows: a known default if present, else the first listed."""
    for ami in FALLBACK_AMIS:
        try:
            if ec2.describe_images(ImageIds=[ami])["Images"]:
                return ami
        except ClientError:
            pass
    try:
        images = ec2.describe_images()["Images"]
        if images:
            return images[0]["ImageId"]
    except ClientError as e:
        log(f"describe_images failed: {e}")
    # moto does not validate AMI ids unless asked to; last resort.
    return FALLBACK_AMIS[0]


class SeedError(Exception):
    pass


def instances_by_ip(ec2, ip: str) -> list[dict]:
    res = ec2.describe_instances(Filters=[ec2_filter("private-ip-address", ip)])
    return [i for r in res["Reservations"] for i in r["Instances"] if i.get("PrivateIpAddress") == ip]


def instance_by_ip(ec2, ip: str) -> dict | None:
    """The live (not terminated) instance holding that private IP, if any."""
    for i in instances_by_ip(ec2, ip):
        if i["State"]["Name"] not in ("terminated", "shutting-down"):
            return i
    return None


def run_instance(ec2, ami: str, subnet_id: str, ip: str, asg: str, name: str) -> str:
    live = instance_by_ip(ec2, ip)
    if live:
        log(f"reusing instance {live['InstanceId']} at {ip}")
        return live["InstanceId"]
    subnets = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
    if subnets and ipaddress.ip_address(ip) not in ipaddress.ip_network(subnets[0]["CidrBlock"]):
        raise SeedError(f"{ip} is outside subnet {subnet_id} ({subnets[0]['CidrBlock']})")
    # No live holder: any instance still listed at this IP is a terminated one.
    holders = instances_by_ip(ec2, ip)
    if holders:
        raise SeedError(
            f"{ip} still belongs to terminated instance {holders[0]['InstanceId']}: moto never "
            "frees a terminated instance's IP, use a fresh IP for a replacement node")
    res = ec2.run_instances(
        ImageId=ami,
        InstanceType=INSTANCE_TYPE,
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet_id,
        PrivateIpAddress=ip,
        TagSpecifications=[{
            "ResourceType": "instance",
            "Tags": [
                {"Key": "aws:autoscaling:groupName", "Value": asg},
                {"Key": "Name", "Value": name},
            ],
        }],
    )
    iid = res["Instances"][0]["InstanceId"]
    log(f"ran instance {iid} at {ip} ({name})")
    return iid


def ensure_kms_alias(kms, alias: str, description: str) -> str:
    paginator = kms.get_paginator("list_aliases")
    for page in paginator.paginate():
        for a in page["Aliases"]:
            if a["AliasName"] == alias and a.get("TargetKeyId"):
                log(f"reusing KMS key {a['TargetKeyId']} ({alias})")
                return a["TargetKeyId"]
    key_id = kms.create_key(
        Description=description, KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT"
    )["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    log(f"created KMS key {key_id} ({alias})")
    return key_id


def ensure_bucket(s3, bucket: str, region: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        log(f"reusing bucket {bucket}")
        return
    except ClientError:
        pass
    kwargs = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    s3.create_bucket(**kwargs)
    log(f"created bucket {bucket}")


# --------------------------------------------------------------------------- TLS material

def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def new_key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(kind: str, cn: str = "vault-bootstrap test CA"):
    key = new_key(kind)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vault-bootstrap testbed"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])
    start = now() - dt.timedelta(hours=1)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def default_sans(block: str, server_name: str) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(f"{block}.{n}")) for n in range(1, 200)
    ]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    sans.append(x509.DNSName("localhost"))
    if server_name and server_name != "localhost":
        sans.append(x509.DNSName(server_name))
    return sans


def make_server_cert(ca_key, ca_cert: x509.Certificate, server_key, sans, cn: str,
                     not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vault-bootstrap testbed"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def good_server(ca_key, ca_cert, kind: str, block: str, server_name: str):
    key = new_key(kind)
    start = now()
    cert = make_server_cert(
        ca_key, ca_cert, key, default_sans(block, server_name), server_name,
        start - dt.timedelta(hours=1), start + dt.timedelta(days=365),
    )
    return key, cert


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


def upload_tls(s3, bucket: str, server_pem: bytes, server_key: bytes | None, ca_pem: bytes) -> None:
    s3.put_object(Bucket=bucket, Key="tls/server.pem", Body=server_pem, ContentType="application/x-pem-file")
    if server_key is None:
        s3.delete_object(Bucket=bucket, Key="tls/server.key")
    else:
        s3.put_object(Bucket=bucket, Key="tls/server.key", Body=server_key, ContentType="application/x-pem-file")
    s3.put_object(Bucket=bucket, Key="tls/ca.pem", Body=ca_pem, ContentType="application/x-pem-file")


# --------------------------------------------------------------------------- commands

def check_block(block: str) -> str:
    parts = block.split(".")
    try:
        ok = len(parts) == 3 and parts[0] == "127" and all(0 <= int(p) <= 255 for p in parts)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"--block must look like 127.X.Y, got {block!r}")
    return block


def cmd_up(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    az = f"{args.region}a"
    t0 = time.monotonic()

    ec2 = client("ec2", args)
    log("EC2 (the first moto EC2 call takes several seconds) ...")
    vpc_id = ensure_vpc(ec2)
    subnet_id = ensure_subnet(ec2, vpc_id, f"{args.block}.0/24", az)
    ami = pick_ami(ec2)
    instances = []
    for i in range(args.nodes):
        ip = f"{args.block}.{11 + i}"
        iid = run_instance(ec2, ami, subnet_id, ip, args.asg, f"vault-{i}")
        instances.append({"id": iid, "ip": ip})

    kms = client("kms", args)
    unseal = ensure_kms_alias(kms, "alias/vault-unseal", "vault-bootstrap testbed unseal key")
    escrow = ensure_kms_alias(kms, "alias/vault-escrow", "vault-bootstrap testbed escrow key")

    s3 = client("s3", args)
    ensure_bucket(s3, args.bucket, args.region)
    ca_key, ca_cert = make_ca(args.key_type)
    srv_key, srv_cert = good_server(ca_key, ca_cert, args.key_type, args.block, args.server_name)
    upload_tls(s3, args.bucket, cert_pem(srv_cert), key_pem(srv_key), cert_pem(ca_cert))
    write_file(out / "ca.pem", cert_pem(ca_cert))
    write_file(out / "ca.key", key_pem(ca_key), 0o600)
    write_file(out / "server.pem", cert_pem(srv_cert))
    write_file(out / "server.key", key_pem(srv_key), 0o600)

    env = {
        "region": args.region,
        "moto": args.moto,
        "bucket": args.bucket,
        "asg": args.asg,
        "vpc_id": vpc_id,
        "subnet_id": subnet_id,
        "kms_unseal_key_id": unseal,
        "kms_escrow_key_id": escrow,
        "instances": instances,
        # extras, used by `seed.py tls` as defaults
        "block": args.block,
        "server_name": args.server_name,
        "availability_zone": az,
        "ami": ami,
    }
    env_path = out / "env.json"
    write_file(env_path, (json.dumps(env, indent=2) + "\n").encode())
    log(f"done in {time.monotonic() - t0:.1f} s")
    print(env_path.resolve(), flush=True)
    return 0


def cmd_tls(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    env = {}
    if (d / "env.json").exists():
        env = json.loads((d / "env.json").read_text())
    block = args.block or env.get("block") or "127.0.5"
    check_block(block)
    server_name = args.server_name or env.get("server_name") or "vault.internal"
    ca_pem = (d / "ca.pem").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    kind = "rsa" if isinstance(ca_key, rsa.RSAPrivateKey) else "ec"
    s3 = client("s3", args)
    v = args.variant
    start = now()

    srv_key, srv_cert = good_server(ca_key, ca_cert, kind, block, server_name)
    server_pem: bytes = cert_pem(srv_cert)
    server_key: bytes | None = key_pem(srv_key)

    if v == "good":
        write_file(d / "server.pem", server_pem)
        write_file(d / "server.key", server_key, 0o600)
    elif v == "new-ca":
        # A CA rotation: everything is the new CA's; the old one stays beside it for
        # clients that must trust both while the nodes refresh one by one.
        new_ca_key, new_ca_cert = make_ca(kind, "vault-bootstrap test CA (rotated)")
        srv_key, srv_cert = good_server(new_ca_key, new_ca_cert, kind, block, server_name)
        server_pem, server_key = cert_pem(srv_cert), key_pem(srv_key)
        write_file(d / "ca-old.pem", ca_pem)
        ca_pem = cert_pem(new_ca_cert)
        write_file(d / "ca.pem", ca_pem)
        write_file(d / "ca.key", key_pem(new_ca_key), 0o600)
        write_file(d / "server.pem", server_pem)
        write_file(d / "server.key", server_key, 0o600)
    elif v in ("expired", "notyet"):
        nb, na = ((start - dt.timedelta(days=30), start - dt.timedelta(days=1)) if v == "expired"
                  else (start + dt.timedelta(days=1), start + dt.timedelta(days=30)))
        server_pem = cert_pem(make_server_cert(
            ca_key, ca_cert, srv_key, default_sans(block, server_name), server_name, nb, na))
    elif v == "mismatch":
        server_key = key_pem(new_key(kind))
    elif v == "wrong-ca":
        other_key, other_cert = make_ca(kind, "some other CA")
        server_pem = cert_pem(make_server_cert(
            other_key, other_cert, srv_key, default_sans(block, server_name), server_name,
            start - dt.timedelta(hours=1), start + dt.timedelta(days=365)))
    elif v == "san":
        sans = [x509.DNSName("other.example"), x509.IPAddress(ipaddress.ip_address("10.9.9.9"))]
        server_pem = cert_pem(make_server_cert(
            ca_key, ca_cert, srv_key, sans, "other.example",
            start - dt.timedelta(hours=1), start + dt.timedelta(days=365)))
    elif v == "malformed-cert":
        server_pem = MALFORMED_CERT.encode()
    elif v == "malformed-key":
        server_key = MALFORMED_KEY.encode()
    elif v == "missing-key":
        server_key = None
    else:  # argparse restricts choices; keep a guard anyway
        raise SystemExit(f"unknown variant {v}")

    upload_tls(s3, args.bucket, server_pem, server_key, ca_pem)
    log(f"uploaded TLS variant {v!r} to s3://{args.bucket}/tls/")
    print(v, flush=True)
    return 0


def cmd_add_instance(args: argparse.Namespace) -> int:
    ec2 = client("ec2", args)
    name = args.name
    if not name:
        last = int(args.ip.rsplit(".", 1)[1])
        name = f"vault-{last - 11}" if last >= 11 else f"vault-ip{last}"
    ami = args.ami or pick_ami(ec2)
    iid = run_instance(ec2, ami, args.subnet_id, args.ip, args.asg, name)
    print(iid, flush=True)
    return 0


def cmd_terminate(args: argparse.Namespace) -> int:
    ec2 = client("ec2", args)
    res = ec2.terminate_instances(InstanceIds=[args.id])
    for t in res["TerminatingInstances"]:
        print(t["InstanceId"], t["CurrentState"]["Name"], flush=True)
    return 0


# --------------------------------------------------------------------------- IAM (enforced)

# The names the shipped policies (packer/examples/) are written for.
SHIPPED_BUCKET = "acme-vault-resources"
SHIPPED_CLUSTER = "prod-vault"
SHIPPED_REGION = "eu-west-1"
ESCROW_PREFIX = "vault-bootstrap/"
ROLE_NAME = "vault-node"
SEAL_SID = "AwsKmsSeal"


def listify(v) -> list:
    return v if isinstance(v, list) else [v]


def unique(xs: list) -> list:
    return list(dict.fromkeys(xs))


def adapt_s3_arn(arn: str, bucket: str, escrow_bucket: str) -> list[str]:
    """The shipped bucket's ARNs as the test-bed names them: objects under the escrow
    prefix live in the escrow bucket, every other object in the resources bucket, and a
    statement on the bucket itself (ListBucket) covers both."""
    arn = arn.replace(SHIPPED_CLUSTER, "{cluster}")
    base = f"arn:aws:s3:::{SHIPPED_BUCKET}"
    if arn == base:
        return unique([f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{escrow_bucket}"])
    if arn.startswith(f"{base}/{ESCROW_PREFIX}"):
        return [f"arn:aws:s3:::{escrow_bucket}{arn[len(base):]}"]
    if arn.startswith(f"{base}/"):
        return [f"arn:aws:s3:::{bucket}{arn[len(base):]}"]
    return [arn]


def adapt_policy(doc: dict, bucket: str, escrow_bucket: str, cluster: str, region: str,
                 drop_decrypt: bool = False) -> dict:
    """A shipped policy with the test-bed's names. Two changes beyond names, both because of
    what moto 5.2.5 evaluates: every KMS statement's Resource becomes "*" (moto matches KMS
    actions against "*" only, never a key ARN), and the Conditions are kept as written
    although moto ignores every one of them (an Allow with a Condition allows). With
    `drop_decrypt`, kms:Decrypt is taken out of every statement (a statement left with no
    action goes)."""
    out = []
    for st in doc["Statement"]:
        st = json.loads(json.dumps(st))
        actions = listify(st["Action"])
        if drop_decrypt:
            actions = [a for a in actions if a.lower() != "kms:decrypt"]
            if not actions:
                continue
        st["Action"] = actions
        resources: list[str] = []
        for r in listify(st["Resource"]):
            if r.startswith("arn:aws:kms:"):
                resources.append("*")
            else:
                resources += adapt_s3_arn(r, bucket, escrow_bucket)
        st["Resource"] = unique([r.replace("{cluster}", cluster) for r in resources])
        if "Condition" in st:
            cond = {}
            for op, kv in st["Condition"].items():
                cond[op] = {}
                for k, v in kv.items():
                    vals: list[str] = []
                    for x in listify(v):
                        xs = adapt_s3_arn(x, bucket, escrow_bucket) if x.startswith("arn:aws:s3:::") else [x]
                        vals += [y.replace("{cluster}", cluster).replace(SHIPPED_CLUSTER, cluster)
                                 .replace(SHIPPED_REGION, region) for y in xs]
                    vals = unique(vals)
                    cond[op][k] = vals if isinstance(v, list) or len(vals) > 1 else vals[0]
            st["Condition"] = cond
        out.append(st)
    return {"Version": doc["Version"], "Statement": out}


def iso(t) -> str:
    if isinstance(t, dt.datetime):
        return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(t)


def cmd_iam(args: argparse.Namespace) -> int:
    out = Path(args.out)
    env = json.loads((out / "env.json").read_text())
    bucket = args.bucket
    escrow_bucket = args.escrow_bucket or bucket
    cluster = args.cluster or env["asg"]
    node_shipped = json.loads(Path(args.node_policy).read_text())
    node = adapt_policy(node_shipped, bucket, escrow_bucket, cluster, args.region,
                        drop_decrypt=args.no_decrypt)
    seal_stmts = [st for st in adapt_policy(node_shipped, bucket, escrow_bucket, cluster, args.region)["Statement"]
                  if st.get("Sid") == SEAL_SID]
    if not seal_stmts:
        raise SeedError(f"{args.node_policy} has no statement {SEAL_SID!r} for the seal")
    seal = {"Version": "2012-10-17", "Statement": seal_stmts}
    operator = adapt_policy(json.loads(Path(args.operator_policy).read_text()),
                            bucket, escrow_bucket, cluster, args.region)
    admin = {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}

    iam = client("iam", args)

    def user(name: str, doc: dict) -> dict:
        arn = iam.create_user(UserName=name)["User"]["Arn"]
        iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(doc))
        k = iam.create_access_key(UserName=name)["AccessKey"]
        log(f"created IAM user {name}")
        return {"Arn": arn, "AccessKeyId": k["AccessKeyId"], "SecretAccessKey": k["SecretAccessKey"]}

    keys = {"admin": user("admin", admin), "vault-seal": user("vault-seal", seal),
            "operator": user("operator", operator)}
    # The trust policy names the admin user: moto answers 500 to a Service principal
    # (ec2.amazonaws.com) when the role is assumed. The admin assumes it per instance.
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": keys["admin"]["Arn"]}, "Action": "sts:AssumeRole"}]}
    role_arn = iam.create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName=ROLE_NAME, PolicyName=ROLE_NAME, PolicyDocument=json.dumps(node))
    log(f"created role {ROLE_NAME} ({'without kms:Decrypt' if args.no_decrypt else 'shipped node policy'})")

    admin_keys = (keys["admin"]["AccessKeyId"], keys["admin"]["SecretAccessKey"])
    if args.object_lock:
        if escrow_bucket == bucket:
            raise SeedError("--object-lock needs --escrow-bucket: retention is bucket-wide")
        s3 = client("s3", args, admin_keys)
        s3.create_bucket(Bucket=escrow_bucket, ObjectLockEnabledForBucket=True)
        s3.put_object_lock_configuration(Bucket=escrow_bucket, ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": args.retention_days}}})
        log(f"created bucket {escrow_bucket} with Object Lock, COMPLIANCE {args.retention_days} d")

    sts = client("sts", args, admin_keys)
    sessions = {}
    for inst in env["instances"]:
        c = sts.assume_role(RoleArn=role_arn, RoleSessionName=inst["id"])["Credentials"]
        sessions[inst["ip"]] = {"AccessKeyId": c["AccessKeyId"], "SecretAccessKey": c["SecretAccessKey"],
                                "Token": c["SessionToken"], "Expiration": iso(c["Expiration"])}
    log(f"assumed {ROLE_NAME} for {len(sessions)} instances")

    write_file(out / "iam.json", (json.dumps({
        "users": keys, "role_arn": role_arn, "sessions": sessions,
        "policies": {"node": node, "vault-seal": seal, "operator": operator},
    }, indent=2) + "\n").encode(), 0o600)
    write_file(out / "imds-credentials.json", (json.dumps(sessions, indent=2) + "\n").encode(), 0o600)
    write_file(out / "admin-keys.json", (json.dumps({
        "AccessKeyId": admin_keys[0], "SecretAccessKey": admin_keys[1]}) + "\n").encode(), 0o600)

    if args.enforce:
        # From the next request on, moto checks every signature and identity policy.
        # Not form-encoded: moto reads the raw body, which Flask empties for a form.
        req = urllib.request.Request(f"{args.moto.rstrip('/')}/moto-api/reset-auth", data=b"0",
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            log(f"moto enforces IAM now: {r.read().decode()[:200]}")
    print(out / "iam.json", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--moto", required=True, help="moto endpoint URL, e.g. http://127.0.0.1:5000")
    common.add_argument("--region", default="us-east-1")
    common.add_argument("--moto-keys", default=None,
                        help="JSON file with the keys to sign with (moto enforcing IAM)")

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", parents=[common], help="create the cluster's AWS state")
    up.add_argument("--block", type=check_block, default="127.0.5", help="address block 127.X.Y")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--asg", default="test-vault")
    up.add_argument("--bucket", default="vault-resources")
    up.add_argument("--out", required=True, help="directory for env.json and PEM files")
    up.add_argument("--server-name", default="vault.internal")
    up.add_argument("--key-type", choices=("ec", "rsa"), default="ec",
                    help="key type of the CA and server keys (default EC P-256)")
    up.set_defaults(func=cmd_up)

    tls = sub.add_parser("tls", parents=[common], help="re-upload a TLS variant")
    tls.add_argument("--bucket", default="vault-resources")
    tls.add_argument("--dir", required=True, help="the --out directory of `up` (ca.key, ca.pem)")
    tls.add_argument("--variant", required=True, choices=VARIANTS)
    tls.add_argument("--block", default=None, help="default: from DIR/env.json, else 127.0.5")
    tls.add_argument("--server-name", default=None, help="default: from DIR/env.json, else vault.internal")
    tls.set_defaults(func=cmd_tls)

    add = sub.add_parser("add-instance", parents=[common], help="run one more instance")
    add.add_argument("--ip", required=True)
    add.add_argument("--asg", default="test-vault")
    add.add_argument("--subnet-id", required=True)
    add.add_argument("--name", default=None, help="Name tag (default vault-<last octet - 11>)")
    add.add_argument("--ami", default=None)
    add.set_defaults(func=cmd_add_instance)

    term = sub.add_parser("terminate", parents=[common], help="terminate one instance")
    term.add_argument("--id", required=True)
    term.set_defaults(func=cmd_terminate)

    iam = sub.add_parser("iam", parents=[common], help="IAM identities of an enforced test-bed")
    iam.add_argument("--out", required=True, help="the --out directory of `up` (env.json)")
    iam.add_argument("--bucket", default="vault-resources")
    iam.add_argument("--escrow-bucket", default=None, help="default: --bucket")
    iam.add_argument("--cluster", default=None, help="cluster tag value (default: the ASG name)")
    iam.add_argument("--node-policy", required=True, help="packer/examples/iam-policy.json")
    iam.add_argument("--operator-policy", required=True,
                     help="packer/examples/iam-policy-operator.json")
    iam.add_argument("--no-decrypt", action="store_true",
                     help="take every kms:Decrypt out of the node role's policy")
    iam.add_argument("--object-lock", action="store_true",
                     help="create --escrow-bucket with Object Lock, COMPLIANCE default retention")
    iam.add_argument("--retention-days", type=int, default=1)
    iam.add_argument("--enforce", action="store_true",
                     help="turn moto's IAM checks on when done (POST /moto-api/reset-auth 0)")
    iam.set_defaults(func=cmd_iam)

    args = p.parse_args(argv)
    # The crash trials at full count use 140 instances of one test-bed.
    if getattr(args, "nodes", 1) < 1 or getattr(args, "nodes", 1) > 180:
        p.error("--nodes must be 1..180 (IPs .11 .. .190, covered by the certificate)")
    try:
        return args.func(args)
    except SeedError as e:
        log(f"error: {e}")
        return 1
    except ClientError as e:
        log(f"AWS error: {e}")
        return 1
    except (BotoCoreError, ResponseParserError, OSError) as e:
        # moto answers e.g. RunInstances with an IP outside the subnet or already in use
        # with a bare HTML 500 page, which botocore cannot parse.
        log(f"error talking to moto at {args.moto}: {type(e).__name__}: {str(e)[:300]}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
