// The console's service worker: it keeps the shell (the page, the manifest, the icons)
// so an installed console opens, and says "offline", without the gateway; and it shows
// and routes the clicks of notifications where a page may not construct them (Android).
//
// It caches ONLY the shell, under exact paths with no query string. Everything else,
// /api/* and the /api/events stream above all (decisions, the state, anything a session
// can read), is never intercepted: the browser fetches it as if there were no worker,
// and nothing of it is stored. The login URL (/?token=...) has a query string, so it is
// not intercepted either, and the token is never a cache key.
"use strict";
const CACHE = "sled-shell-v1";
const SHELL = ["/", "/manifest.webmanifest", "/icons/icon-192.png", "/icons/icon-512.png"];

function isShell(url) {
  return url.origin === self.location.origin && url.search === "" && SHELL.includes(url.pathname);
}

// A response worth keeping: our own, complete, and not an error or the login page.
function keepable(response) {
  return response.ok && response.status === 200 && response.type === "basic" && !response.redirected;
}

self.addEventListener("install", event => {
  // The page itself is cached on its first load through the worker (it needs the session).
  event.waitUntil(caches.open(CACHE)
    .then(cache => cache.addAll(SHELL.filter(path => path !== "/")))
    .then(() => self.skipWaiting()));
});

self.addEventListener("activate", event => {
  event.waitUntil(caches.keys()
    .then(names => Promise.all(names.filter(n => n !== CACHE).map(n => caches.delete(n))))
    .then(() => self.clients.claim()));
});

self.addEventListener("fetch", event => {
  const request = event.request;
  if (request.method !== "GET") return;
  const url = new URL(request.url);
  if (!isShell(url)) return;  // not ours to answer: straight to the network, never stored
  // Network first: the gateway's answer is the truth (a 401 login page when the session
  // ended); the cached shell only when the gateway cannot be reached.
  event.respondWith(fetch(request).then(response => {
    if (keepable(response)) {
      const copy = response.clone();
      event.waitUntil(caches.open(CACHE).then(cache => cache.put(url.pathname, copy)));
    }
    return response;
  }, () => caches.match(url.pathname).then(hit => hit || Response.error())));
});

// A click on a notification the worker showed: bring a console window forward and
// tell it which request to show (the page focuses that card).
self.addEventListener("notificationclick", event => {
  event.notification.close();
  const key = (event.notification.data || {}).key;
  event.waitUntil(self.clients.matchAll({type: "window", includeUncontrolled: true}).then(windows => {
    const win = windows.find(w => new URL(w.url).pathname === "/") || windows[0];
    if (!win) return self.clients.openWindow("/");
    win.postMessage({type: "show-request", key});
    return win.focus();
  }));
});
