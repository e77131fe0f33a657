// A real OpenID Provider for the sign-in tests: npm `oidc-provider` (installed by
// scripts/install-oidc-provider.sh), with its own login and consent pages
// (devInteractions: the package's built-in interaction UI, which takes any
// password for a known account), one static confidential client that must use
// PKCE, and three people: alice, bob, and mallory (whose email, alice's, is not
// verified).
//
//   node tests/oidc/provider.mjs <install dir>
//
// It listens on a free 127.0.0.1 port and prints `listening <port>`, then reads
// one JSON line per command on stdin and answers each with one line on stdout:
//   {"issuer": URL|null, "redirect_uri": URL, "client_id": ID, "client_secret": S}
//       → `ready <issuer>` (the issuer defaults to http://127.0.0.1:<port>)
//   {"fault": null|"issuer"|"audience"|"signature"|"expired"|"replay"}
//       → `fault <name>`
// A fault makes the token endpoint misbehave the way a rogue or broken
// provider (or a man in the middle of the token response) would: the ID token
// it returns is re-signed with another issuer, another audience, an expiry in
// the past, or by a key that is not the provider's (same key id); "replay"
// returns the previous login's ID token (its nonce is that login's).
import { createServer } from 'node:http';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const dir = process.argv[2];
const load = (path) => import(pathToFileURL(join(dir, 'node_modules', path)).href);
const { default: Provider } = await load('oidc-provider/lib/index.js');
const jose = await load('jose/dist/webapi/index.js');

const PEOPLE = {
  alice: {
    sub: 'alice', email: 'alice@example.test', email_verified: true,
    name: 'Alice Liddell', groups: ['web-team', 'approvers'],
  },
  bob: {
    sub: 'bob', email: 'bob@example.test', email_verified: true,
    name: 'Bob Builder', groups: ['api-team'],
  },
  // Typed alice's address into her profile; the provider never verified it.
  mallory: {
    sub: 'mallory', email: 'alice@example.test', email_verified: false,
    name: 'Mallory', groups: [],
  },
};

async function signingKey(kid) {
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  return { jwk: { ...jwk, kid, alg: 'RS256', use: 'sig' }, key: privateKey };
}

const own = await signingKey('test-key');
const rogue = await signingKey('test-key'); // the same kid: only the signature differs
let fault = null;
let lastIdToken = null;

async function resign(idToken, change, key) {
  const claims = { ...jose.decodeJwt(idToken), ...change };
  return new jose.SignJWT(claims)
    .setProtectedHeader({ alg: 'RS256', kid: 'test-key', typ: 'JWT' })
    .sign(key);
}

async function misbehave(idToken) {
  const now = Math.floor(Date.now() / 1000);
  switch (fault) {
    case 'issuer': return resign(idToken, { iss: 'http://127.0.0.1:1/another-issuer' }, own.key);
    case 'audience': return resign(idToken, { aud: 'another-client', azp: 'another-client' }, own.key);
    case 'signature': return resign(idToken, {}, rogue.key);
    case 'expired': return resign(idToken, { iat: now - 7200, exp: now - 3600 }, own.key);
    case 'replay': return lastIdToken ?? idToken;
    default: return idToken;
  }
}

const server = createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const { port } = server.address();
console.log(`listening ${port}`);

function start({ issuer, redirect_uri: redirectUri, client_id: clientId, client_secret: secret }) {
  const iss = issuer || `http://127.0.0.1:${port}`;
  const provider = new Provider(iss, {
    clients: [{
      client_id: clientId,
      client_secret: secret,
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    jwks: { keys: [own.jwk] },
    pkce: { required: () => true },
    scopes: ['openid', 'email', 'profile', 'groups'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name'],
      groups: ['groups'],
    },
    // Put the scopes' claims in the ID token, as Keycloak and Dex do.
    conformIdTokenClaims: false,
    features: { devInteractions: { enabled: true } },
    cookies: { keys: ['sled-uplink-tests-only'] },
    async findAccount(ctx, id) {
      const person = PEOPLE[id];
      if (!person) return undefined;
      return { accountId: id, async claims() { return { ...person }; } };
    },
  });
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.method !== 'POST' || ctx.path !== '/token' || ctx.status !== 200) return;
    const idToken = ctx.body && ctx.body.id_token;
    if (!idToken) return;
    ctx.body = { ...ctx.body, id_token: await misbehave(idToken) };
    lastIdToken = idToken;
  });
  server.on('request', provider.callback());
  return iss;
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const command = JSON.parse(line);
  if ('redirect_uri' in command) {
    console.log(`ready ${start(command)}`);
  } else if ('fault' in command) {
    fault = command.fault;
    console.log(`fault ${fault}`);
  }
}
process.exit(0);
