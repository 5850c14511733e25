//! The GNU Taler error codes (GANA `taler_error_codes`) that the sandbox answers with.
//!
//! Only the codes a real taler-merchant-httpd returns on the endpoints the sandbox serves.

/// A parameter in the request was missing.
pub const GENERIC_PARAMETER_MISSING: u32 = 25;
/// A parameter in the request was malformed.
pub const GENERIC_PARAMETER_MALFORMED: u32 = 26;
/// The HTTP method is invalid for this endpoint.
pub const GENERIC_METHOD_INVALID: u32 = 20;
/// There is no endpoint for the URL.
pub const GENERIC_ENDPOINT_UNKNOWN: u32 = 21;
/// The JSON in the request was malformed.
pub const GENERIC_JSON_INVALID: u32 = 22;
/// The currency is not acceptable for this server.
pub const GENERIC_CURRENCY_MISMATCH: u32 = 30;
/// The body is too large.
pub const GENERIC_UPLOAD_EXCEEDS_LIMIT: u32 = 32;
/// Missing or wrong access token.
pub const GENERIC_UNAUTHORIZED: u32 = 40;
/// The service failed to store information (used for "the store is full").
pub const GENERIC_DB_STORE_FAILED: u32 = 52;
/// The service failed to fetch information (used for injected server errors).
pub const GENERIC_DB_FETCH_FAILED: u32 = 53;
/// The backend could not find the merchant instance.
pub const MERCHANT_GENERIC_INSTANCE_UNKNOWN: u32 = 2000;
/// The order is not known to the backend.
pub const MERCHANT_GENERIC_ORDER_UNKNOWN: u32 = 2005;
/// The claim token is invalid for this order.
pub const MERCHANT_GET_ORDERS_ID_INVALID_TOKEN: u32 = 2105;
/// The contract terms hash is invalid for this order.
pub const MERCHANT_GET_ORDERS_ID_INVALID_CONTRACT_HASH: u32 = 2106;
/// The payment is too late, the offer has expired.
pub const MERCHANT_POST_ORDERS_ID_PAY_OFFER_EXPIRED: u32 = 2161;
/// Someone else claimed the order first.
pub const MERCHANT_POST_ORDERS_ID_CLAIM_ALREADY_CLAIMED: u32 = 2301;
/// The order could not be parsed.
pub const MERCHANT_PRIVATE_POST_ORDERS_PROPOSAL_PARSE_ERROR: u32 = 2502;
/// A different order with this order id exists.
pub const MERCHANT_PRIVATE_POST_ORDERS_ALREADY_EXISTS: u32 = 2503;
/// The wire deadline is before the refund deadline.
pub const MERCHANT_PRIVATE_POST_ORDERS_REFUND_AFTER_WIRE_DEADLINE: u32 = 2504;
/// The delivery date is in the past.
pub const MERCHANT_PRIVATE_POST_ORDERS_DELIVERY_DATE_IN_PAST: u32 = 2505;
/// A wire deadline of "never" is not allowed.
pub const MERCHANT_PRIVATE_POST_ORDERS_WIRE_DEADLINE_IS_NEVER: u32 = 2506;
/// The payment deadline is in the past.
pub const MERCHANT_PRIVATE_POST_ORDERS_PAY_DEADLINE_IN_PAST: u32 = 2507;
/// The refund deadline is in the past.
pub const MERCHANT_PRIVATE_POST_ORDERS_REFUND_DEADLINE_IN_PAST: u32 = 2508;
/// The refund amount is lower than before or more than was paid.
pub const MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_INCONSISTENT_AMOUNT: u32 = 2530;
/// Only paid orders can be refunded.
pub const MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_ORDER_UNPAID: u32 = 2531;
/// The refund delay was zero (or the deadline passed): no refunds.
pub const MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_NOT_ALLOWED_BY_CONTRACT: u32 = 2532;
