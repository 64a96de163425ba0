// The public HTTP API, and nothing else: JSON requests with the tab's API key as a bearer header,
// errors in the API's one shape ({"error": {"type", "message"}}) turned into ApiError, and
// Server-Sent Events read with fetch() (EventSource cannot send an Authorization header).

const KEY_STORE = "resa.apiKey";

export class ApiError extends Error {
  constructor(status, type, message, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.body = body;
  }

  /** A 401/403: the key is missing, wrong, or its scope does not allow the action. */
  get isAuth() {
    return this.status === 401 || this.status === 403;
  }

  /** The route does not exist on this server (an older or newer API). */
  get isMissingRoute() {
    return this.status === 405 || (this.status === 404 && /^no route /.test(this.message));
  }
}

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORE) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
  } catch {
    /* storage disabled: the key lives for this page only */
  }
}

function headers(extra = {}, withKey = true) {
  const out = { Accept: "application/json", ...extra };
  const key = withKey ? getKey() : "";
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function toError(res, quiet = false) {
  let body = null;
  let text = "";
  try {
    text = await res.text();
    body = JSON.parse(text);
  } catch {
    /* not JSON: a proxy's page, or empty */
  }
  const err = body && typeof body === "object" ? body.error : null;
  const type = (err && err.type) || `http_${res.status}`;
  let message = (err && err.message) || (text && text.length < 300 ? text.trim() : "") || `${res.status} ${res.statusText || "error"}`;
  const error = new ApiError(res.status, type, message, body);
  if (error.isAuth && !quiet) window.dispatchEvent(new CustomEvent("resa:auth-error", { detail: error }));
  return error;
}

function networkError(exc) {
  if (exc && exc.name === "AbortError") return exc;
  return new ApiError(0, "network", `cannot reach the server (${exc && exc.message ? exc.message : exc})`);
}

/**
 * request("GET", "/skills") → parsed JSON. Options: json (a body to send as JSON), body + contentType
 * (raw), signal (AbortSignal), auth (false: send no key, for the development-mode probe).
 */
export async function request(method, path, { json, body, contentType, signal, auth = true } = {}) {
  const extra = {};
  if (json !== undefined) {
    extra["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (contentType) {
    extra["Content-Type"] = contentType;
  }
  let res;
  try {
    res = await fetch(path, { method, headers: headers(extra, auth), body, signal, cache: "no-store", credentials: "omit" });
  } catch (exc) {
    throw networkError(exc);
  }
  if (!res.ok) throw await toError(res, !auth); // a probe without the key is not a rejected key
  const type = res.headers.get("content-type") || "";
  if (res.status === 204) return null;
  return type.includes("json") ? res.json() : res.text();
}

export const api = {
  get: (path, opts) => request("GET", path, opts),
  post: (path, json, opts = {}) => request("POST", path, { ...opts, json }),
  del: (path, opts) => request("DELETE", path, opts),
};

/** Query string from an object, leaving out empty values. */
export function qs(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  const text = q.toString();
  return text ? `?${text}` : "";
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue; // comment / keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

/**
 * Server-Sent Events from a GET or POST, as an async iterator of {event, data} (data is the raw
 * string). An error status before the stream starts throws ApiError; abort with `signal`.
 */
export async function* sse(method, path, { json, signal } = {}) {
  const extra = { Accept: "text/event-stream" };
  if (json !== undefined) extra["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: headers(extra),
      body: json === undefined ? undefined : JSON.stringify(json),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (exc) {
    throw networkError(exc);
  }
  if (!res.ok) throw await toError(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (exc) {
        throw networkError(exc);
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      for (let m = buffer.match(/\r?\n\r?\n/); m; m = buffer.match(/\r?\n\r?\n/)) {
        const block = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        const ev = parseEvent(block);
        if (ev) yield ev;
      }
    }
    const tail = parseEvent(buffer + decoder.decode());
    if (tail) yield tail;
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** A short human line for any error: the API's message and type, or the exception's text. */
export function describe(err) {
  if (err instanceof ApiError) {
    if (err.isAuth) return `API key rejected: ${err.message}`;
    if (err.status === 0) return `Network error: ${err.message}`;
    return `${err.message}`;
  }
  return err && err.message ? err.message : String(err);
}

/** A binary download (e.g. the report PNG) with the key; returns a Blob. */
export async function blob(path, { signal } = {}) {
  let res;
  try {
    res = await fetch(path, { headers: headers({ Accept: "*/*" }), signal, cache: "no-store", credentials: "omit" });
  } catch (exc) {
    throw networkError(exc);
  }
  if (!res.ok) throw await toError(res);
  return res.blob();
}
