#!/usr/bin/env python3
"""An echo bot for confab (Python standard library only): registers a webhook for the
messages of its channels, checks each delivery's signature, and answers "ping" with "pong"
(and any other text with "echo: <text>") through the HTTP API.

    CONFAB_URL=http://127.0.0.1:8080 BOT_TOKEN=<bot jwt> python3 echo_bot.py [--port 8700]
"""
import argparse, hashlib, hmac, http.server, json, os, time, urllib.request

API, TOKEN = os.environ.get("CONFAB_URL", "http://127.0.0.1:8080"), os.environ["BOT_TOKEN"]


def call(method, path, body):
    req = urllib.request.Request(API + path, json.dumps(body).encode(), method=method, headers={
        "Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def signature_is_valid(secret: str, header: str, raw_body: bytes, tolerance_s: int = 300) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    t, v1 = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or abs(time.time() - int(t)) > tolerance_s:
        return False  # missing, or too old: a replayed delivery
    expected = hmac.new(secret.encode(), t.encode() + b"." + raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1)


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not signature_is_valid(SECRET, self.headers.get("Confab-Signature", ""), raw):
            self.send_response(401)
            self.end_headers()
            return
        event = json.loads(raw)
        if event.get("type") == "message":
            reply = "pong" if event["text"] == "ping" else "echo: " + event["text"]
            # client_msg_id makes a redelivered event (same seq) answer only once.
            call("POST", f"/v1/channels/{event['channel']}/messages",
                 {"text": reply, "client_msg_id": f"echo-{event['seq']}"})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="confab echo bot")
    parser.add_argument("--port", type=int, default=8700, help="port to receive webhooks on (0: any)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", parser.parse_args().port), Hook)
    url = f"http://127.0.0.1:{server.server_port}/"
    SECRET = call("POST", "/v1/webhooks", {"url": url, "events": ["message"]})["secret"]
    print(f"echo bot listening on {url}", flush=True)
    server.serve_forever()
