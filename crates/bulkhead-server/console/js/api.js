// The public JSON API, called with the admin token kept in this tab's sessionStorage only.

const TOKEN_KEY = "bulkhead.admin-token";

export const token = () => sessionStorage.getItem(TOKEN_KEY);
export const setToken = (t) => sessionStorage.setItem(TOKEN_KEY, t);
export const clearToken = () => sessionStorage.removeItem(TOKEN_KEY);

/** A non-2xx answer: the contract's `{"error": {"code", "message"}}`. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let onUnauthorized = () => {};
export const whenUnauthorized = (f) => { onUnauthorized = f; };

/** Calls the API; resolves to the parsed body, rejects with an ApiError. */
export async function api(method, path, body, tokenOverride) {
  const headers = { Authorization: `Bearer ${tokenOverride ?? token() ?? ""}` };
  const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "unreachable", "The server did not answer.");
  }
  const text = await resp.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (!resp.ok) {
    const err = json?.error ?? {};
    const e = new ApiError(resp.status, err.code ?? "http_" + resp.status, err.message ?? resp.statusText);
    if (resp.status === 401 && tokenOverride === undefined && e.code === "invalid_credentials") onUnauthorized(e);
    throw e;
  }
  return json;
}

export const enc = encodeURIComponent;
