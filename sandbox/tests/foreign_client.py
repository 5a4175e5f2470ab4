#!/usr/bin/env python3
"""A WeChat Pay v3 merchant written from the published protocol alone, with Python's
`cryptography` package and the standard library: no paystream code. It proves the sandbox
serves any conforming client, not just ours.

Usage: foreign_client.py BASE_URL IDENTITY_DIR
Prints "OK" on success; any failed check raises (non-zero exit).
"""
import base64
import http.server
import json
import os
import secrets
import string
import sys
import threading
import time
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BASE, DIR = sys.argv[1], sys.argv[2]


def read(name):
    with open(os.path.join(DIR, name), "rb") as f:
        return f.read()


MCHID = read("mchid").decode().strip()
APPID = read("appid").decode().strip()
SERIAL = read("merchant_serial_no").decode().strip()
APIV3 = read("apiv3_key").strip()
PUB_ID = read("platform_public_key_id").decode().strip()
KEY = serialization.load_pem_private_key(read("merchant_private_key.pem"), password=None)
PLATFORM = serialization.load_pem_public_key(read("platform_public_key.pem"))
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def nonce(n=32):
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(n))


def verify(headers, body):
    """Wechatpay-Signature over TIMESTAMP\\nNONCE\\nBODY\\n with WeChat's public key."""
    assert headers["Wechatpay-Serial"] == PUB_ID, headers["Wechatpay-Serial"]
    ts = headers["Wechatpay-Timestamp"]
    assert abs(int(time.time()) - int(ts)) < 300
    msg = f"{ts}\n{headers['Wechatpay-Nonce']}\n".encode() + body + b"\n"
    PLATFORM.verify(base64.b64decode(headers["Wechatpay-Signature"]), msg, padding.PKCS1v15(), hashes.SHA256())


def call(method, path, payload=None):
    body = b"" if payload is None else json.dumps(payload, ensure_ascii=False).encode()
    ts, n = str(int(time.time())), nonce()
    msg = f"{method}\n{path}\n{ts}\n{n}\n".encode() + body + b"\n"
    sig = base64.b64encode(KEY.sign(msg, padding.PKCS1v15(), hashes.SHA256())).decode()
    auth = (f'WECHATPAY2-SHA256-RSA2048 mchid="{MCHID}",nonce_str="{n}",signature="{sig}",'
            f'timestamp="{ts}",serial_no="{SERIAL}"')
    req = urllib.request.Request(BASE + path, data=body if payload is not None else None, method=method, headers={
        "Authorization": auth, "Accept": "application/json", "Content-Type": "application/json",
        "User-Agent": "foreign-python-client/1.0", "Wechatpay-Serial": PUB_ID,
    })
    try:
        with OPENER.open(req, timeout=10) as resp:
            status, headers, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    verify(headers, raw)
    return status, (json.loads(raw) if raw else None)


def control(path, payload):
    req = urllib.request.Request(BASE + path, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with OPENER.open(req, timeout=10) as resp:
        return resp.status


received = []


class Notify(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        received.append((self.headers, body))  # case-insensitive lookup
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Notify)
threading.Thread(target=server.serve_forever, daemon=True).start()
notify_url = f"http://127.0.0.1:{server.server_port}/notify"

out_trade_no = "PY" + nonce(20)
order = {"appid": APPID, "mchid": MCHID, "description": "Python 测试订单", "out_trade_no": out_trade_no,
         "notify_url": notify_url, "amount": {"total": 1999, "currency": "CNY"},
         "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}}
status, answer = call("POST", "/v3/pay/transactions/jsapi", order)
assert status == 200 and answer["prepay_id"], (status, answer)

status, answer = call("GET", f"/v3/pay/transactions/out-trade-no/{out_trade_no}?mchid={MCHID}")
assert status == 200 and answer["trade_state"] == "NOTPAY", (status, answer)

status, answer = call("GET", f"/v3/pay/transactions/out-trade-no/NOSUCHORDER123?mchid={MCHID}")
assert status == 404 and answer["code"] == "ORDER_NOT_EXIST", (status, answer)

assert control(f"/sandbox/v1/transactions/{out_trade_no}/pay", {"result": "SUCCESS"}) == 200

deadline = time.time() + 10
while not received and time.time() < deadline:
    time.sleep(0.01)
assert received, "no callback within 10 s"
headers, body = received[0]
verify(headers, body)
note = json.loads(body)
res = note["resource"]
assert note["event_type"] == "TRANSACTION.SUCCESS" and res["algorithm"] == "AEAD_AES_256_GCM"
plain = AESGCM(APIV3).decrypt(res["nonce"].encode(), base64.b64decode(res["ciphertext"]),
                              res["associated_data"].encode())
tx = json.loads(plain)
assert tx["out_trade_no"] == out_trade_no and tx["trade_state"] == "SUCCESS", tx
assert tx["amount"]["total"] == 1999

status, answer = call("POST", f"/v3/pay/transactions/out-trade-no/{out_trade_no}/close", {"mchid": MCHID})
assert status == 403, (status, answer)
print("OK")
