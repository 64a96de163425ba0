// The skill explorer: hash routes (linkable, the back button works), the API key field, and the
// page-wide error banner. Pages live in their own modules and render into <main>.

import { ApiError, describe, getKey, request, setKey } from "./api.js";
import { hideTip, invalidate } from "./common.js";
import { h, replace } from "./dom.js";
import { inspectPage } from "./inspect.js";
import { jobPage, jobsPage } from "./jobs.js";
import { latentPage } from "./latent.js";
import { playgroundPage } from "./playground.js";
import { skillPage, skillsPage } from "./skills.js";

const ROUTES = [
  [/^\/skills$/, skillsPage, "skills", () => "Skills"],
  [/^\/skills\/(?<name>[^/]+)$/, skillPage, "skills", (p) => p.name],
  [/^\/skills\/(?<name>[^/]+)\/latents\/(?<index>\d+)$/, latentPage, "skills", (p) => `Latent ${p.index} · ${p.name}`],
  [/^\/inspect$/, inspectPage, "inspect", () => "Inspect"],
  [/^\/playground$/, playgroundPage, "playground", () => "Playground"],
  [/^\/jobs$/, jobsPage, "jobs", () => "Jobs"],
  [/^\/jobs\/(?<id>[^/]+)$/, jobPage, "jobs", (p) => `Job ${p.id.slice(0, 8)}`],
];

const main = document.getElementById("main");
const banner = document.getElementById("banner");
const keyInput = document.getElementById("apikey");
const keyState = document.getElementById("key-state");
let controller = null;
let devMode = null; // null: unknown; true: the server needs no key

function showBanner(content, kind = "error") {
  replace(banner, h("span", { class: "banner-text" }, content), h("button", { type: "button", class: "small secondary", "aria-label": "Dismiss", on: { click: () => (banner.hidden = true) } }, "Dismiss"));
  banner.className = `banner banner-${kind}`;
  banner.hidden = false;
}

function setKeyState(text, kind = "") {
  keyState.textContent = text;
  keyState.className = `keystate ${kind}`;
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/skills";
  const [path, search = ""] = raw.split("?");
  return { path: path.replace(/\/+$/, "") || "/skills", query: new URLSearchParams(search) };
}

async function render() {
  if (controller) controller.abort();
  controller = new AbortController();
  hideTip();
  const { path, query } = parseHash();
  for (const a of document.querySelectorAll(".mainnav a")) a.removeAttribute("aria-current");
  for (const [pattern, page, nav, title] of ROUTES) {
    const m = path.match(pattern);
    if (!m) continue;
    const params = Object.fromEntries(Object.entries(m.groups || {}).map(([k, v]) => [k, decodeURIComponent(v)]));
    document.querySelector(`.mainnav a[data-nav="${nav}"]`)?.setAttribute("aria-current", "page");
    document.title = `${title(params)} · resa`;
    try {
      await page(main, { params, query, signal: controller.signal });
    } catch (err) {
      if (err && err.name === "AbortError") return;
      replace(main, h("div", { class: "error", role: "alert" }, h("strong", "This page failed: "), describe(err)));
    }
    return;
  }
  document.title = "Not found · resa";
  replace(main, h("h1", "Not found"), h("p", `No page at ${path}. `, h("a", { href: "#/skills" }, "Go to the skills")));
}

async function probe() {
  // Development mode (no keys configured) answers without a key.
  try {
    await request("GET", "/models", { auth: false });
    devMode = true;
  } catch (err) {
    devMode = err instanceof ApiError && err.status === 401 ? false : null;
  }
  refreshKeyState();
}

function refreshKeyState() {
  const key = getKey();
  if (devMode === true) setKeyState("development mode: no key needed", "ok");
  else if (key) setKeyState("key set for this tab", "ok");
  else if (devMode === false) setKeyState("this server needs a key", "warn");
  else setKeyState("");
}

function setupKeyForm() {
  keyInput.value = getKey();
  document.getElementById("keyform").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setKey(keyInput.value.trim());
    invalidate();
    banner.hidden = true;
    refreshKeyState();
    if (getKey()) {
      try {
        await request("GET", "/models");
        setKeyState(devMode ? "development mode: no key needed" : "key accepted for this tab", "ok");
      } catch (err) {
        if (!(err instanceof ApiError && err.isAuth)) setKeyState(describe(err), "warn");
      }
    }
    render();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    setKey("");
    keyInput.value = "";
    invalidate();
    banner.hidden = true;
    refreshKeyState();
    render();
  });
  window.addEventListener("resa:auth-error", (ev) => {
    const err = ev.detail;
    showBanner([h("strong", "API key rejected: "), err.message, getKey() ? "" : " Enter a key in the field above."]);
    setKeyState(err.status === 403 ? "key lacks the scope" : getKey() ? "key rejected" : "key required", "bad");
  });
}

function setupGlobalErrors() {
  const show = (what) => showBanner([h("strong", "Unexpected error in the page: "), what]);
  window.addEventListener("error", (ev) => show(ev.message || "unknown error"));
  window.addEventListener("unhandledrejection", (ev) => {
    const reason = ev.reason;
    if (reason && reason.name === "AbortError") return;
    show(describe(reason));
  });
}

function setupSkipLink() {
  document.getElementById("skip-link").addEventListener("click", (ev) => {
    ev.preventDefault(); // "#main" is not a route
    main.focus();
  });
}

let lastPath = null;
window.addEventListener("hashchange", async () => {
  const { path } = parseHash();
  const moved = path !== lastPath;
  lastPath = path;
  banner.hidden = true; // the new page shows its own errors
  await render();
  if (moved) {
    window.scrollTo(0, 0);
    const active = document.activeElement;
    if (!active || active === document.body || !document.contains(active)) main.focus({ preventScroll: true });
  }
});

setupKeyForm();
setupGlobalErrors();
setupSkipLink();
lastPath = parseHash().path;
probe().then(render);
