/**
 * Amounts: exact decimal strings on the wire, strings in answers.
 *
 * An amount is a string (`"2.50"`), a bigint (`2n`) or a number. A number is read from its
 * shortest representation (`String(2.5)` is `"2.5"`), never through its binary value; numbers
 * that only print with an exponent (`1e-7`, `1e21`), NaN, infinities and negatives are refused.
 * More than six decimal places is a `RangeError`, never rounded. Nothing is sent when an amount
 * is refused.
 *
 * @module
 */

/** What the SDK accepts wherever an amount goes: `"2.50"`, `2n` or `2.5`. */
export type Amount = string | number | bigint;

/** The most decimal places an amount may have (the server counts in micro-units). */
export const MAX_DECIMALS = 6;

const PLAIN = /^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$/;

/**
 * The decimal string sent for `value`.
 *
 * @param value - the amount.
 * @param name - what the amount is, for error messages (`"amount"`, `"spendingCap"`, …).
 * @returns a plain non-negative decimal string with at most six decimals, e.g. `"2.50"`.
 * @throws TypeError when `value` is not a string, number or bigint.
 * @throws RangeError when it is negative, not finite, written with an exponent, not a plain
 *   decimal, or has more than six decimal places.
 */
export function amountText(value: Amount, name = "amount"): string {
  let text: string;
  if (typeof value === "bigint") {
    if (value < 0n) throw new RangeError(`${name} must not be negative: ${value}`);
    return value.toString();
  } else if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new RangeError(`${name} must be a finite number, not ${value}`);
    if (value < 0) throw new RangeError(`${name} must not be negative: ${value}`);
    text = String(value);
    if (/e/i.test(text)) {
      throw new RangeError(
        `${name} ${text} only has an exponent form; pass it as a decimal string (amounts are never rounded)`,
      );
    }
  } else if (typeof value === "string") {
    text = value;
  } else {
    throw new TypeError(`${name} must be a string, number or bigint, not ${value === null ? "null" : typeof value}`);
  }
  if (!PLAIN.test(text)) {
    throw new RangeError(`${name} must be a plain non-negative decimal like "2.50", not ${JSON.stringify(text)}`);
  }
  let [whole = "", fraction = ""] = text.split(".") as [string, string?];
  if (whole === "") whole = "0";
  if (fraction.length > MAX_DECIMALS) {
    // Trailing zeros are no precision: "1.5000000" is 1.5. Anything else would need rounding.
    if (/[^0]/.test(fraction.slice(MAX_DECIMALS))) {
      throw new RangeError(
        `${name} has more than ${MAX_DECIMALS} decimal places: ${JSON.stringify(text)} (amounts are never rounded)`,
      );
    }
    fraction = fraction.slice(0, MAX_DECIMALS);
  }
  return fraction === "" ? whole : `${whole}.${fraction}`;
}

/**
 * An amount as integer micro-units (`"2.50"` is `2500000n`), for exact arithmetic on answers.
 *
 * @throws RangeError/TypeError as {@link amountText} does.
 */
export function toMicros(value: Amount): bigint {
  const text = amountText(value);
  const [whole = "0", fraction = ""] = text.split(".") as [string, string?];
  return BigInt(whole) * 1_000_000n + BigInt(fraction.padEnd(MAX_DECIMALS, "0"));
}

/** Integer micro-units as a decimal string with at least two decimals (`2500000n` is `"2.50"`). */
export function fromMicros(micros: bigint): string {
  const negative = micros < 0n;
  const abs = negative ? -micros : micros;
  const whole = abs / 1_000_000n;
  let fraction = (abs % 1_000_000n).toString().padStart(MAX_DECIMALS, "0").replace(/0+$/, "");
  if (fraction.length < 2) fraction = fraction.padEnd(2, "0");
  return `${negative ? "-" : ""}${whole}.${fraction}`;
}

/** An amount from an answer: a decimal string kept as it is (a JSON number is rendered as text). */
export function answerAmount(value: unknown): string {
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "bigint") return String(value);
  throw new TypeError(`not an amount: ${JSON.stringify(value)}`);
}

/** {@link answerAmount}, with `null` for a missing or null amount. */
export function optionalAmount(value: unknown): string | null {
  return value === null || value === undefined ? null : answerAmount(value);
}
