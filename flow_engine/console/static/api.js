// The engine's API, called with the key the user typed. The key lives in sessionStorage
// (gone when the tab closes) and travels in a header, never in a URL.

const KEY = "flowgate.key";

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.details = error;
  }
}

export function headers(extra = {}) {
  return { "x-api-key": key.get() || "", ...extra };
}

/** Call /api/v1{path}; JSON in and out. ``message`` goes with a change to its audit entry. */
export async function api(method, path, body, { message } = {}) {
  const extra = {};
  if (body !== undefined) extra["content-type"] = "application/json";
  if (message) extra["x-flowgate-message"] = encodeURIComponent(message);
  const response = await fetch(`/api/v1${path}`, {
    method,
    headers: headers(extra),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.error) || { message: text.slice(0, 200) });
  }
  return data;
}

export const get = (path) => api("GET", path);
