/* Kilde browser tracker (k.js), no dependencies. Docs: docs/website-tracking.md
 * Load it with the snippet from `kilde snippet --source NAME`; it talks to the collector's
 * Segment-spec endpoints (/v1/batch, text/plain so no CORS preflight). */
(function (w, d) {
  "use strict";
  var VERSION = "__KILDE_VERSION__";
  var q = w.kilde;
  if (!q || q.live || !q.k) return; // needs the snippet (collector address, write key)
  var host = String(q.h || "").replace(/\/+$/, ""), key = q.k, opts = q.o || {};
  var nav = navigator, loc = w.location, ls = null, AID = "kilde_aid", YEAR = 31536000;
  try { ls = w.localStorage; ls.getItem(AID); } catch (e) { ls = null; } // blocked storage

  var S = null;             // settings of this source, from the collector
  var consent = getJ("consent"); // {p: {purpose: bool}, v: banner version}
  var gpc = nav.globalPrivacyControl === true;
  var aid = null, uid = null, live = false, idDone = false, serverTried = false;
  var calls = [], held = [], queue = [], waiters = [], settling = null; // settling: see identity()
  var timer = 0, tries = 0, sending = false, ref = d.referrer, lastUrl = loc.href;

  // -- storage: nothing is written unless the cookie's purpose is allowed -------------------
  function get(k) { try { return ls ? ls.getItem("kilde_" + k) : null; } catch (e) { return null; } }
  function getJ(k) { try { return JSON.parse(get(k) || "null"); } catch (e) { return null; } }
  function put(k, v, force) {
    if (!force && !canStore()) return;
    try { if (ls) ls.setItem("kilde_" + k, typeof v == "string" ? v : JSON.stringify(v)); } catch (e) {}
  }
  function del(k) { try { if (ls) ls.removeItem("kilde_" + k); } catch (e) {} }
  function readCookie(n) {
    var m = d.cookie.match(new RegExp("(?:^|; )" + n + "=([^;]*)"));
    try { return m ? decodeURIComponent(m[1]) : null; } catch (e) { return null; }
  }
  function writeCookie(v, age) {
    d.cookie = AID + "=" + encodeURIComponent(v) + "; max-age=" + age + "; path=/; samesite=lax" +
      (loc.protocol == "https:" ? "; secure" : "");
  }

  // -- consent --------------------------------------------------------------------------------
  function def(p) { return (S && S.purposes[p]) || { consent: true }; }
  function allowed(p) {
    var x = def(p);
    if (x.sale && gpc) return false; // Global Privacy Control: no sale or sharing
    return !x.consent || !!(consent && consent.p[p] === true);
  }
  function decided(p) { var x = def(p); return !x.consent || (x.sale && gpc) || !!(consent && p in consent.p); }
  function any(list, f) { for (var i = 0; i < list.length; i++) if (f(list[i])) return true; return false; }
  function all(list, f) { return !any(list, function (p) { return !f(p); }); }
  function ok(list) { return !list.length || any(list, allowed); }
  function canStore() { return !!S && ok(S.cookie); }
  function purposesOf(type, name) {
    var e = S.events;
    return (type == "page" ? e.page : e["track:" + name]) || S.cookie;
  }

  // -- identity -------------------------------------------------------------------------------
  function uuid() {
    var c = w.crypto;
    if (c.randomUUID) return c.randomUUID();
    var b = c.getRandomValues(new Uint8Array(16)), h = "", i;
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    for (i = 0; i < 16; i++) h += (b[i] + 256).toString(16).slice(1) + (i == 3 || i == 5 || i == 7 || i == 9 ? "-" : "");
    return h;
  }
  function keepId() {
    if (!canStore()) return;
    if (readCookie(AID) !== aid) writeCookie(aid, YEAR);
    put("aid", aid);
    if (uid) put("uid", uid); else del("uid");
  }
  // Settle the anonymous id: the stored one, else a new one; the collector's HTTP cookie (kept
  // longer by Safari than script cookies) wins when it has one. While the collector's answer is
  // on its way, callers wait in `settling`, in order, so none sends under an id about to change.
  function identity(done) {
    if (!canStore()) { aid = aid || uuid(); idDone = false; return done(); }
    if (!idDone) {
      aid = readCookie(AID) || get("aid") || aid || uuid();
      uid = uid || get("uid");
      idDone = true;
      keepId();
    }
    if (settling) return settling.push(done);
    if (!S.serverCookie || serverTried) return done();
    serverTried = true;
    settling = [done];
    post("/v1/cookie", { writeKey: key, anonymousId: aid }, true)
      .then(function (r) { return r.json(); })
      .then(function (j) {
        if (j.gpc) gpc = true;
        if (j.anonymousId && j.anonymousId !== aid) { aid = j.anonymousId; keepId(); }
      })
      .catch(function () {})
      .then(function () {
        var list = settling; settling = null;
        for (var i = 0; i < list.length; i++) list[i]();
      });
  }
  function forget() {
    writeCookie("", 0);
    del("aid"); del("uid"); del("queue"); del("settings");
    idDone = false;
    if (S && S.serverCookie) post("/v1/cookie", { writeKey: key, forget: true }, true).catch(function () {});
  }

  // -- messages -------------------------------------------------------------------------------
  function campaign() {
    var c = {}, n = 0, p, map = { utm_source: "source", utm_medium: "medium", utm_campaign: "name",
      utm_term: "term", utm_content: "content", gclid: "gclid", fbclid: "fbclid" };
    try { p = new URLSearchParams(loc.search); } catch (e) { return null; }
    for (var k in map) if (p.get(k)) { c[map[k]] = p.get(k).slice(0, 200); n++; }
    return n ? c : null;
  }
  function pageProps() {
    return { path: loc.pathname, referrer: ref, search: loc.search, title: d.title, url: loc.href };
  }
  function context() {
    var c = {
      library: { name: "kilde.js", version: VERSION },
      locale: nav.language,
      page: pageProps(),
      screen: { width: w.screen.width, height: w.screen.height, density: w.devicePixelRatio }
    }, camp = campaign();
    try { c.timezone = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) {}
    if (camp) c.campaign = camp;
    if (gpc) c.gpc = true;
    return c;
  }
  function make(type, f) {
    f.type = type; f.messageId = uuid(); f.timestamp = new Date().toISOString(); f.context = context();
    return f;
  }
  function emit(f, purposes) {
    if (ok(purposes)) return enqueue(f);
    if (f.type == "page" && S.cookieless) {
      // An aggregate count: no identifier, path only, nothing stored.
      return enqueue({ type: "page", messageId: f.messageId, timestamp: f.timestamp,
        anonymousId: "cookieless", properties: { path: loc.pathname },
        context: { library: f.context.library, cookieless: true } }, true);
    }
    if (!all(purposes, decided) && held.length < 100) held.push([f, purposes]);
  }
  function enqueue(f, anon) {
    if (!anon) { f.anonymousId = aid; if (uid) f.userId = uid; }
    queue.push(f);
    if (queue.length > 500) queue.shift();
    save();
    schedule(tries ? null : 300);
  }
  function release() {
    var h = held; held = [];
    for (var i = 0; i < h.length; i++) emit(h[i][0], h[i][1]);
  }

  // -- sending: batches, retry with backoff, offline queue, beacon on hide ------------------
  // The queue in localStorage is shared by the site's tabs: each write merges this tab's queue
  // into what is stored (less what was just sent), so one tab never overwrites another's events.
  function save(sent) {
    if (!canStore()) return;
    var stored = getJ("queue"), list = (stored instanceof Array ? stored : []).concat(queue);
    var seen = {}, out = [], i, f;
    for (i = 0; i < list.length; i++) {
      f = list[i];
      if (!f || !f.messageId || seen[f.messageId] || (sent && sent[f.messageId])) continue;
      seen[f.messageId] = 1;
      out.push(f);
    }
    put("queue", out.length > 500 ? out.slice(out.length - 500) : out);
  }
  function post(path, body, cred) {
    var text = JSON.stringify(body);
    return fetch(host + path, {
      method: "POST", body: text, headers: { "Content-Type": "text/plain" },
      // keepalive (the request outlives the page) allows 64 KB; a bigger body goes without it
      credentials: cred ? "include" : "omit", keepalive: !cred && new Blob([text]).size < 60000,
      mode: "cors"
    });
  }
  function schedule(ms) {
    if (timer) return;
    if (ms == null) ms = Math.min(30000, 1000 * Math.pow(2, tries - 1)) * (0.5 + Math.random() / 2);
    timer = setTimeout(flush, ms);
  }
  function chunk() { // at most 100 events and about 60 KB (the keepalive and sendBeacon limit)
    var out = [], size = 0;
    for (var i = 0; i < queue.length && out.length < 100; i++) {
      size += JSON.stringify(queue[i]).length;
      if (out.length && size > 60000) break;
      out.push(queue[i]);
    }
    return out;
  }
  function done(batch) {
    var ids = {};
    for (var i = 0; i < batch.length; i++) ids[batch[i].messageId] = 1;
    queue = queue.filter(function (f) { return !ids[f.messageId]; });
    save(ids);
  }
  function body(batch, how) {
    var b = { writeKey: key, sentAt: new Date().toISOString(), batch: batch };
    if (how) b.context = { transport: how }; // shared by the batch's messages
    return b;
  }
  function flush() {
    timer = 0;
    if (sending || !queue.length) return;
    var batch = chunk();
    sending = true;
    post("/v1/batch", body(batch))
      .then(function (r) {
        // 2xx: stored. Other 4xx: the collector will never take it (it kept it as a dead letter).
        if (r.ok || (r.status < 500 && r.status != 408 && r.status != 429)) { tries = 0; done(batch); }
        else tries++;
      }, function () { tries++; })
      .then(function () { sending = false; if (queue.length) schedule(tries ? null : 0); });
  }
  function beaconFlush() {
    if (tries || !queue.length || !nav.sendBeacon) return; // collector down: kept for next page
    while (queue.length) {
      var batch = chunk();
      if (!nav.sendBeacon(host + "/v1/batch", new Blob([JSON.stringify(body(batch, "beacon"))], { type: "text/plain" }))) return;
      done(batch);
    }
  }

  // -- the API --------------------------------------------------------------------------------
  function obj(x) { return x && typeof x == "object" ? x : {}; }
  var api = {
    page: function (name, props) {
      if (typeof name == "object") { props = name; name = null; }
      var p = pageProps(), k, f;
      props = obj(props);
      for (k in props) p[k] = props[k];
      f = make("page", { properties: p });
      if (name) f.name = String(name);
      emit(f, purposesOf("page"));
    },
    track: function (event, props) {
      // Without a name the collector keeps the event as a dead letter (missing_event), where the
      // site's owner sees it, instead of storing an event called "undefined".
      if (event == null || event === "") {
        if (w.console) console.warn("kilde.track needs an event name, such as kilde.track('Signed Up')");
        event = undefined;
      } else event = String(event);
      emit(make("track", { event: event, properties: obj(props) }), purposesOf("track", event));
    },
    identify: function (userId, traits) {
      if (typeof userId == "object") { traits = userId; userId = null; }
      if (userId != null) { uid = String(userId); put("uid", uid); }
      emit(make("identify", { traits: obj(traits) }), S.cookie);
    },
    alias: function (to, from) {
      var f = make("alias", { previousId: from ? String(from) : uid || aid });
      uid = String(to); put("uid", uid);
      emit(f, S.cookie);
    },
    reset: function () {
      uid = null; del("uid");
      aid = uuid(); keepId();
    },
    consent: function (choices, options) {
      if (choices === undefined) return consent ? consent.p : null; // the recorded choice
      var p = (consent && consent.p) || {}, eff = {}, k, before = canStore();
      choices = obj(choices);
      for (k in choices) {
        p[k] = choices[k] === true;
        eff[k] = p[k] && !(def(k).sale && gpc);
      }
      consent = { p: p, v: obj(options).version || (consent && consent.v) || null };
      put("consent", consent, true); // the choice itself is kept, so that it is honoured
      // Made now, so it carries this choice's time and version even when sent after a later one.
      var choice = make("track", { event: "Consent Updated",
        properties: { purposes: eff, banner_version: consent.v, gpc: gpc } });
      function record() { enqueue(choice); }
      if (before && !canStore()) { // withdrawn: record it under the old id, then forget that id
        var withdraw = function () { record(); forget(); uid = null; aid = uuid(); held = []; };
        // A choice made while the id was settling is recorded first, so the ledger keeps the
        // order the visitor chose in and the settled id is the one forgotten.
        if (settling) settling.push(withdraw); else withdraw();
        return eff;
      }
      identity(function () { record(); save(); release(); });
      return eff;
    }
  };
  function wrap(name) {
    return function () {
      if (!live) { calls.push([name, [].slice.call(arguments)]); return; }
      return api[name].apply(null, arguments);
    };
  }
  var k = {
    VERSION: VERSION, live: true,
    anonymousId: function () { return aid; },
    ready: function (fn) { if (live) fn(); else waiters.push(fn); }
  };
  for (var n in api) k[n] = wrap(n);
  for (var i = 0; i < q.length; i++) {
    if (q[i] && q[i][0] == "ready") waiters.push(q[i][1][0]);
    else if (q[i] && api[q[i][0]]) calls.push([q[i][0], q[i][1] || []]);
  }
  w.kilde = k;

  function hookHistory() {
    function changed() {
      setTimeout(function () {
        if (loc.href.split("#")[0] == lastUrl.split("#")[0]) return;
        ref = lastUrl; lastUrl = loc.href;
        api.page();
      }, 0);
    }
    ["pushState", "replaceState"].forEach(function (m) {
      var orig = history[m];
      history[m] = function () { var r = orig.apply(this, arguments); changed(); return r; };
    });
    w.addEventListener("popstate", changed);
  }

  function start(s) {
    var first = !S;
    S = s;
    if (s.gpc) gpc = true;
    if (!first) return;
    if (canStore()) queue = getJ("queue") || []; // left over from earlier pages
    identity(function () {
      live = true;
      var c = calls; calls = [];
      for (var i = 0; i < c.length; i++) api[c[i][0]].apply(null, c[i][1]);
      if (opts.autoPage !== false) { api.page(); hookHistory(); }
      put("settings", S);
      for (i = 0; i < waiters.length; i++) waiters[i]();
      schedule(0);
    });
  }
  function boot(attempt) {
    fetch(host + "/v1/settings?writeKey=" + encodeURIComponent(key), { credentials: "omit" })
      .then(function (r) { if (!r.ok) throw 0; return r.json(); })
      .then(function (s) { start(s); if (canStore()) put("settings", s); }, function () {
        setTimeout(function () { boot(attempt + 1); }, Math.min(30000, 1000 * Math.pow(2, attempt)));
      });
  }
  var cached = getJ("settings");
  if (cached && cached.purposes) start(cached);
  boot(0);
  w.addEventListener("pagehide", beaconFlush);
  d.addEventListener("visibilitychange", function () { if (d.visibilityState == "hidden") beaconFlush(); });
  w.addEventListener("online", function () { tries = 0; clearTimeout(timer); timer = 0; flush(); });
})(window, document);
