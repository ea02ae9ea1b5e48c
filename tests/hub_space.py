"""The local Hub (tests/hubserver.py) plus what a deployed Space meets on the real one.

- Space repositories: created with `HfApi.create_repo(repo_type="space", space_sdk=...)`, filled with
  `upload_folder(repo_type="space")` (preupload, LFS, commit, tree), read back with `space_info`.
- Hugging Face's OpenID Connect provider, as gradio's OAuth routes (authlib) call it: discovery
  (`/.well-known/openid-configuration`), `/oauth/authorize` with a sign-in page and a consent page (the
  requested scopes listed, the user's organisations to tick), `/oauth/token` (an access token plus an
  RS256-signed id_token), `/oauth/userinfo` and the JWKS.
- OAuth access tokens act within what was granted, as on the Hub: private repos need `read-repos` (and
  the organisation ticked), public gated repos need `gated-repos` besides the user's own grant, writing
  needs `write-repos`, creating and deleting repos `manage-repos`; whoami lists the ticked organisations
  only; a token past its lifetime gets 401.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, urlencode

from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.hubserver import _REPO, Blob, HubServer, Repo, Token, _Handler, _HubError

SPACE_KEY = "spaces/"  # Space repos live in HubServer.repos under "spaces/<owner>/<name>"
HUB_SESSION_COOKIE = "hub_session"
READ_SCOPES = frozenset({"read-repos", "write-repos", "manage-repos"})
WRITE_SCOPES = frozenset({"write-repos", "manage-repos"})
SCOPE_TEXT = {
    "openid": "Know who you are (your username)",
    "profile": "Read your profile (name, picture)",
    "email": "Read your email address",
    "read-repos": "Read your personal and selected organisations' repositories",
    "write-repos": "Write to your personal and selected organisations' repositories",
    "manage-repos": "Create and delete repositories in your namespace and selected organisations",
    "gated-repos": "Read public gated repositories you have been granted access to",
    "contribute-repos": "Create repositories and open pull requests",
    "jobs": "Run Jobs on your account",
    "read-billing": "Know whether you have a payment method",
}


@dataclass(frozen=True)
class OAuthAccess(Token):
    """An access token issued by the OAuth flow: the user's rights, limited to the scopes and orgs granted."""

    scopes: frozenset[str] = frozenset()
    orgs: frozenset[str] = frozenset()
    expires_at: float = 0.0


@dataclass(frozen=True)
class OAuthClient:
    client_id: str
    secret: str
    redirect_uri: str  # the callback, e.g. https://<SPACE_HOST>/login/callback (query strings may follow)
    name: str = "LLM Merger"


@dataclass(frozen=True)
class _Code:
    client_id: str
    user: str
    scopes: frozenset[str]
    orgs: frozenset[str]
    redirect_uri: str
    nonce: str | None
    expires: float


@dataclass
class SpaceInfo:
    sdk: str
    private: bool


class SpaceHub(HubServer):
    """HubServer with Space repos and the OAuth/OpenID provider; users sign in with `passwords`."""

    def __init__(self, *, passwords: Mapping[str, str] | None = None, token_lifetime: float = 8 * 3600,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.passwords = dict(passwords or {"alice": "alice-password", "bob": "bob-password"})
        self.token_lifetime = token_lifetime
        self.clients: dict[str, OAuthClient] = {}
        self.space_infos: dict[str, SpaceInfo] = {}
        self.issued: list[OAuthAccess] = []
        self.payment_required: set[str] = set()  # users whose new Spaces the Hub refuses with 402
        self.created_with: dict[str, Token] = {}  # repo id -> the token that created it
        self._codes: dict[str, _Code] = {}
        self._sessions: dict[str, str] = {}  # hub sign-in cookie -> user
        self._key = RSAKey.generate_key(2048, parameters={"kid": "local-hub", "use": "sig", "alg": "RS256"})

    # ------------------------------------------------------------------ set-up and inspection

    def register_client(self, client_id: str, secret: str, redirect_uri: str) -> OAuthClient:
        client = OAuthClient(client_id, secret, redirect_uri)
        self.clients[client_id] = client
        return client

    def create_space(self, repo_id: str, *, sdk: str, private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private=private, created_at=self._now())
            self.repos[SPACE_KEY + repo_id] = repo
            self.space_infos[repo_id] = SpaceInfo(sdk, private)
            self._commit(repo, {".gitattributes": Blob(b"*.bin filter=lfs diff=lfs merge=lfs -text\n", False)},
                         "initial commit")
            return repo

    def space_files(self, repo_id: str) -> dict[str, bytes]:
        return {p: b.data for p, b in self.repos[SPACE_KEY + repo_id].head().files.items()}

    def expire_tokens(self, user: str) -> None:
        """Every OAuth token of `user` expires now (as after hf_oauth_expiration_minutes)."""
        with self.lock:
            for key, token in list(self.tokens.items()):
                if isinstance(token, OAuthAccess) and token.user == user:
                    self.tokens[key] = OAuthAccess(token.user, token.role, token.writable, token.scopes,
                                                   token.orgs, time.time() - 1)

    def tokens_of(self, user: str) -> list[str]:
        return [k for k, t in self.tokens.items() if isinstance(t, OAuthAccess) and t.user == user]

    # ------------------------------------------------------------------ rights of OAuth tokens

    def _in_reach(self, namespace: str, token: OAuthAccess) -> bool:
        return namespace == token.user or namespace in token.orgs

    def _can_read(self, repo: Repo, token: Token | None) -> bool:
        if isinstance(token, OAuthAccess) and repo.private:
            if not token.scopes & READ_SCOPES or not self._in_reach(repo.namespace, token):
                return False
        return super()._can_read(repo, token)

    def _can_write_namespace(self, namespace: str, token: Token | None) -> bool:
        if isinstance(token, OAuthAccess) and (not token.scopes & WRITE_SCOPES or not self._in_reach(namespace, token)):
            return False
        return super()._can_write_namespace(namespace, token)

    def _check_gate(self, repo: Repo, token: Token | None) -> None:
        if (isinstance(token, OAuthAccess) and repo.gated and "gated-repos" not in token.scopes
                and not self._can_write_namespace(repo.namespace, token)):
            raise _HubError(403, f"Access to model {repo.repo_id} is restricted: this OAuth app was not granted "
                                 "the gated-repos scope.", "GatedRepo")
        super()._check_gate(repo, token)

    def _handler_class(self) -> type[_Handler]:
        return _SpaceHandler

    # ------------------------------------------------------------------ OAuth internals

    def _issue(self, code: _Code) -> tuple[str, OAuthAccess]:
        value = "hf_oauth_" + secrets.token_hex(16)
        access = OAuthAccess(code.user, "oauth", frozenset(), code.scopes, code.orgs,
                             time.time() + self.token_lifetime)
        with self.lock:
            self.tokens[value] = access
            self.issued.append(access)
        return value, access

    def _user_claims(self, user: str) -> dict[str, Any]:
        return {"sub": hashlib.md5(user.encode()).hexdigest()[:24], "name": user.title(),
                "preferred_username": user, "profile": f"{self.url}/{user}",
                "picture": f"{self.url}/avatars/{user}.png", "website": ""}

    def _id_token(self, client_id: str, user: str, nonce: str | None) -> str:
        now = int(time.time())
        claims = {"iss": self.url, "aud": client_id, "iat": now, "exp": now + int(self.token_lifetime),
                  "auth_time": now, **self._user_claims(user)}
        if nonce:
            claims["nonce"] = nonce
        return jwt.encode({"alg": "RS256", "kid": self._key.kid}, claims, self._key)


_OAUTH_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/\.well-known/openid-configuration$"), "openid_configuration"),
    ("GET", re.compile(r"^/oauth/authorize$"), "authorize_page"),
    ("POST", re.compile(r"^/oauth/authorize$"), "authorize_submit"),
    ("POST", re.compile(r"^/oauth/token$"), "oauth_token"),
    ("GET", re.compile(r"^/oauth/userinfo$"), "userinfo"),
    ("GET", re.compile(r"^/oauth/jwks$"), "jwks"),
    ("GET", re.compile(rf"^/api/spaces/{_REPO}$"), "space_info"),
    ("GET", re.compile(rf"^/api/spaces/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "space_tree"),
    ("POST", re.compile(rf"^/api/spaces/{_REPO}/preupload/(?P<rev>[^/]+)$"), "space_preupload"),
    ("POST", re.compile(rf"^/api/spaces/{_REPO}/commit/(?P<rev>[^/]+)$"), "space_commit"),
    ("POST", re.compile(rf"^/spaces/{_REPO}\.git/info/lfs/objects/batch$"), "space_lfs_batch"),
    ("POST", re.compile(rf"^/spaces/{_REPO}\.git/info/lfs/objects/verify$"), "space_lfs_verify"),
]


class _SpaceHandler(_Handler):
    hub: SpaceHub

    def _find_route(self, method: str, path: str) -> tuple[str, str, dict[str, str]] | None:
        for verb, pattern, handler in _OAUTH_ROUTES:
            m = pattern.match(path)
            if verb == method and m:
                return handler, handler, {k: v for k, v in m.groupdict().items() if v is not None}
        return super()._find_route(method, path)

    def _token(self) -> Token | None:
        token = super()._token()
        if isinstance(token, OAuthAccess) and token.expires_at < time.time():
            raise _HubError(401, "Invalid credentials in Authorization header (the OAuth token has expired)")
        return token

    # ------------------------------------------------------------------ identity and repos

    def whoami(self, body: bytes) -> None:
        token = self._token()
        if not isinstance(token, OAuthAccess):
            super().whoami(body)
            return
        orgs = [{"type": "org", "name": org, "fullname": org, "roleInOrg": role, "isEnterprise": False}
                for org, role in sorted(self.hub.users.get(token.user, {}).items()) if org in token.orgs]
        expires = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(token.expires_at))
        self._json({"type": "user", "id": hashlib.md5(token.user.encode()).hexdigest()[:24], "name": token.user,
                    "fullname": token.user.title(), "isPro": False, "orgs": orgs,
                    "auth": {"type": "oauth", "expiresAt": expires, "scope": " ".join(sorted(token.scopes))}})

    def create(self, body: bytes) -> None:
        token = self._token()
        payload = json.loads(body or b"{}")
        if isinstance(token, OAuthAccess) and "manage-repos" not in token.scopes:
            raise _HubError(403, "This OAuth app was not granted the manage-repos scope")
        if payload.get("type") != "space":
            super().create(body)
            namespace = payload.get("organization") or (token.user if token else None)
            if token is not None and f"{namespace}/{payload.get('name')}" in self.hub.repos:
                self.hub.created_with.setdefault(f"{namespace}/{payload.get('name')}", token)
            return
        namespace = payload.get("organization") or (token.user if token else None)
        repo_id = f"{namespace}/{payload.get('name')}"
        if token is None:
            raise _HubError(401, "You must be authenticated to create a Space")
        if not self.hub._can_write_namespace(namespace, token):
            raise _HubError(403, f'You don\'t have the rights to create a Space under the namespace "{namespace}"')
        if token.user in self.hub.payment_required:
            raise _HubError(402, "Payment required: add a payment method or subscribe to PRO to create this Space")
        if payload.get("sdk") not in ("gradio", "docker", "static"):
            raise _HubError(400, "Space SDK must be one of gradio, docker, static")
        with self.hub.lock:
            if SPACE_KEY + repo_id in self.hub.repos:
                self._json({"error": "You already created this space repo",
                            "url": f"{self.hub.url}/spaces/{repo_id}"}, 409)
                return
            self.hub.create_space(repo_id, sdk=payload["sdk"], private=payload.get("visibility") == "private")
        self._json({"url": f"{self.hub.url}/spaces/{repo_id}", "name": repo_id, "id": repo_id})

    def delete(self, body: bytes) -> None:
        token = self._token()
        if isinstance(token, OAuthAccess) and "manage-repos" not in token.scopes:
            raise _HubError(403, "This OAuth app was not granted the manage-repos scope")
        super().delete(body)

    def space_info(self, body: bytes, repo: str) -> None:
        token = self._token()
        hub_repo = self.hub._repo_for_read(SPACE_KEY + repo, token)
        info = self.hub.space_infos[repo]
        commit = hub_repo.head()
        self._json({"_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "author": hub_repo.namespace,
                    "sha": commit.sha, "lastModified": commit.date, "createdAt": hub_repo.created_at,
                    "private": info.private, "sdk": info.sdk, "likes": 0, "tags": [], "disabled": False,
                    "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                    "runtime": {"stage": "BUILDING", "hardware": {"current": None, "requested": None}}})

    def space_tree(self, body: bytes, repo: str, rev: str, path: str | None = None) -> None:
        self.tree(body, SPACE_KEY + repo, rev, path)

    def space_preupload(self, body: bytes, repo: str, rev: str) -> None:
        self.preupload(body, SPACE_KEY + repo, rev)

    def space_commit(self, body: bytes, repo: str, rev: str) -> None:
        self.commit(body, SPACE_KEY + repo, rev)

    def space_lfs_batch(self, body: bytes, repo: str) -> None:
        self.lfs_batch(body, SPACE_KEY + repo)

    def space_lfs_verify(self, body: bytes, repo: str) -> None:
        self.lfs_verify(body, SPACE_KEY + repo)

    # ------------------------------------------------------------------ OpenID Connect provider

    def openid_configuration(self, body: bytes) -> None:
        base = self.hub.url
        self._json({"issuer": base, "authorization_endpoint": f"{base}/oauth/authorize",
                    "token_endpoint": f"{base}/oauth/token", "userinfo_endpoint": f"{base}/oauth/userinfo",
                    "jwks_uri": f"{base}/oauth/jwks", "response_types_supported": ["code"],
                    "grant_types_supported": ["authorization_code"], "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                    "scopes_supported": sorted(SCOPE_TEXT), "code_challenge_methods_supported": ["S256"]})

    def jwks(self, body: bytes) -> None:
        self._json({"keys": [self.hub._key.as_dict(private=False)]})

    def _signed_in_user(self) -> str | None:
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == HUB_SESSION_COOKIE:
                return self.hub._sessions.get(value)
        return None

    def _request_params(self, query: Mapping[str, list[str]]) -> tuple[OAuthClient, dict[str, str]]:
        params = {k: v[0] for k, v in query.items() if v}
        client = self.hub.clients.get(params.get("client_id", ""))
        if client is None:
            raise _HubError(400, "Unknown OAuth client_id")
        if params.get("response_type") != "code":
            raise _HubError(400, "Only response_type=code is supported")
        if not params.get("redirect_uri", "").split("?")[0] == client.redirect_uri:
            raise _HubError(400, f"redirect_uri must be {client.redirect_uri}")
        unknown = set(params.get("scope", "").split()) - set(SCOPE_TEXT)
        if unknown:
            raise _HubError(400, f"Unknown scope(s): {', '.join(sorted(unknown))}")
        return client, params

    def authorize_page(self, body: bytes) -> None:
        client, params = self._request_params(self.query)
        user = self._signed_in_user()
        self._page(self._consent_form(client, params, user) if user else self._login_form(params))

    def authorize_submit(self, body: bytes) -> None:
        form = parse_qs(body.decode(), keep_blank_values=True)
        action = (form.get("action") or [""])[0]
        client, params = self._request_params(parse_qs((form.get("request") or [""])[0]))
        if action == "login":
            user = (form.get("username") or [""])[0]
            if self.hub.passwords.get(user) != (form.get("password") or [""])[0] or not user:
                self._page(self._login_form(params, error="Wrong username or password."))
                return
            session = secrets.token_hex(16)
            self.hub._sessions[session] = user
            self._page(self._consent_form(client, params, user),
                       headers={"Set-Cookie": f"{HUB_SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax"})
            return
        user = self._signed_in_user()
        if user is None:
            self._page(self._login_form(params))
            return
        target = params["redirect_uri"]
        sep = "&" if "?" in target else "?"
        if action != "allow":
            self._send(302, headers={"Location": f"{target}{sep}" + urlencode(
                {"error": "access_denied", "state": params.get("state", "")})})
            return
        orgs = frozenset(o for o in form.get("org", []) if o in self.hub.users.get(user, {}))
        code = secrets.token_urlsafe(24)
        self.hub._codes[code] = _Code(client.client_id, user, frozenset(params.get("scope", "").split()), orgs,
                                      target, params.get("nonce"), time.time() + 600)
        self._send(302, headers={"Location": f"{target}{sep}" + urlencode({"code": code,
                                                                           "state": params.get("state", "")})})

    def oauth_token(self, body: bytes) -> None:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items() if v}
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        client = self.hub.clients.get(client_id or "")
        if client is None or not secrets.compare_digest(client.secret, secret or ""):
            self._json({"error": "invalid_client"}, 401)
            return
        code = self.hub._codes.pop(form.get("code", ""), None)
        if (form.get("grant_type") != "authorization_code" or code is None or code.client_id != client.client_id
                or code.expires < time.time() or code.redirect_uri != form.get("redirect_uri")):
            self._json({"error": "invalid_grant"}, 400)
            return
        value, access = self.hub._issue(code)
        answer: dict[str, Any] = {"access_token": value, "token_type": "bearer",
                                  "expires_in": int(access.expires_at - time.time()),
                                  "scope": " ".join(sorted(code.scopes))}
        if "openid" in code.scopes:
            answer["id_token"] = self.hub._id_token(client.client_id, code.user, code.nonce)
        self._json(answer)

    def userinfo(self, body: bytes) -> None:
        token = self._token()
        if not isinstance(token, OAuthAccess):
            raise _HubError(401, "An OAuth access token is required")
        orgs = [{"sub": hashlib.md5(o.encode()).hexdigest()[:24], "preferred_username": o, "name": o}
                for o in sorted(token.orgs)]
        self._json({**self.hub._user_claims(token.user), "orgs": orgs})

    # ------------------------------------------------------------------ pages

    def _page(self, body: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(200, f"<!doctype html><html><head><title>Hugging Face (local)</title></head><body>{body}"
                        "</body></html>".encode(), headers, "text/html; charset=utf-8")

    @staticmethod
    def _hidden_request(params: Mapping[str, str]) -> str:
        return f'<input type="hidden" name="request" value="{html.escape(urlencode(params))}">'

    def _login_form(self, params: Mapping[str, str], error: str = "") -> str:
        note = f'<p id="login-error">{html.escape(error)}</p>' if error else ""
        return (f'<h1>Sign in to Hugging Face</h1>{note}<form method="post" action="/oauth/authorize">'
                f'{self._hidden_request(params)}<input type="hidden" name="action" value="login">'
                '<label>Username <input name="username" id="username"></label>'
                '<label>Password <input name="password" id="password" type="password"></label>'
                '<button type="submit" id="login">Sign in</button></form>')

    def _consent_form(self, client: OAuthClient, params: Mapping[str, str], user: str) -> str:
        scopes = "".join(f'<li data-scope="{s}">{html.escape(SCOPE_TEXT[s])}</li>'
                         for s in params.get("scope", "").split())
        orgs = "".join(f'<label><input type="checkbox" name="org" value="{html.escape(o)}" id="org-{html.escape(o)}">'
                       f' {html.escape(o)}</label>' for o in sorted(self.hub.users.get(user, {})))
        org_block = (f"<p>Organisations this app may act in (only those you tick):</p>{orgs}" if orgs else "")
        return (f'<h1>Authorize {html.escape(client.name)}</h1><p id="signed-in-as">Signed in as {html.escape(user)}'
                f'</p><p>{html.escape(client.name)} asks to:</p><ul id="scopes">{scopes}</ul>'
                f'<form method="post" action="/oauth/authorize">{self._hidden_request(params)}{org_block}'
                '<button type="submit" name="action" value="allow" id="authorize">Authorize</button>'
                '<button type="submit" name="action" value="deny" id="deny">Cancel</button></form>')


def granted(scopes: Iterable[str]) -> str:
    """The scope string a Space's OAuth app asks for: openid and profile, then the card's hf_oauth_scopes."""
    return " ".join(dict.fromkeys(["openid", "profile", *scopes]))


def card_front_matter(text: str) -> dict[str, Any]:
    import yaml

    m = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    return yaml.safe_load(m.group(1)) if m else {}
