"""Serve app.py as a Space does (`python tests/space_serve.py CERT KEY`), for tests/test_space_browser.py.

The environment is the one a Space injects (SPACE_ID, SPACE_HOST, SYSTEM=spaces, OAUTH_CLIENT_ID,
OAUTH_CLIENT_SECRET, OAUTH_SCOPES, OPENID_PROVIDER_URL), set by the test. The one difference from a Space:
the app serves HTTPS itself with a throwaway certificate, because gradio's OAuth sends the browser back to
https://SPACE_HOST/login/callback and its session cookie is Secure; on a Space the proxy in front does TLS.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app  # noqa: E402

if __name__ == "__main__":
    cert, key = sys.argv[1:3]
    app.main(server_name="127.0.0.1", ssl_certfile=cert, ssl_keyfile=key, ssl_verify=False, quiet=True)
