//! taler-paywall: a reverse-proxy paywall gateway that sells access to parts of a website
//! through GNU Taler, without changing the site.
//!
//! A request arrives at the public listener ([`server`]). The [`gateway`] normalises its path
//! once ([`path`]), asks the [`policy`] whether the path is protected, and then either forwards
//! the request to the origin unchanged ([`proxy`]) or runs the storefront algorithm of GNU
//! Taler's design document 007 ([`flow`]): it reads the signed browser session ([`session`]),
//! asks the merchant backend about the resource's order ([`merchant`]), lets the pure state
//! machine ([`payment`]) decide what to do, and carries that out: serve the page, redirect to
//! the order status page, create a fresh order, follow repurchase detection, or show a refund
//! page ([`pages`]).
//!
//! # Layout
//! - [`amount`]: Taler amounts (`KUDOS:1.5`).
//! - [`cli`]: what each subcommand does.
//! - [`logfmt`]: the fields of a text log line, written cheaply and with control characters escaped.
//! - [`config`]: TOML file → validated [`config::Config`]; secrets redacted.
//! - [`path`]: the one path normaliser used for the decision and for forwarding.
//! - [`policy`]: protected prefixes, segment-wise, longest first.
//! - [`body`]: the body type and helpers.
//! - [`pages`]: the synthetic responses (errors, payment required, refunded), from templates.
//! - [`origin_pool`]: keep-alive HTTP/1.1 connections to a plain-`http` origin, per thread.
//! - [`origin_h1`]: its fast path, bodiless `GET`/`HEAD` exchanged in the request's own task.
//! - [`proxy`]: forwarding to the origin (hop-by-hop, `X-Forwarded-*`, streaming, upgrades).
//! - [`server`]: accept loops, TLS, limits, graceful shutdown.
//! - [`gateway`]: one request, from normalisation to response.
//! - [`session`]: signed cookies: session, per-resource orders, payment grants.
//! - [`cookie_memo`]: per-thread memo of cookies already verified, for paid browsers.
//! - [`merchant`]: the merchant backend client and its wire types.
//! - [`payment`]: the pure decision function of the storefront algorithm.
//! - [`flow`]: carries out the payment decisions for one protected request.
//! - [`forward_auth`]: the endpoint a front proxy (nginx, Traefik, Caddy) asks instead.
//! - [`tls`]: verified TLS client configuration for origin and merchant.
//! - [`sandbox`]: the built-in sandbox merchant backend and wallet.
//! - [`demo`]: `taler-paywall demo`, a sample site, the sandbox and the gateway.
//! - [`metrics`]: the Prometheus counters, gauges and histograms.
//! - [`admin`]: the operator listener (health, readiness, metrics), SIGHUP reload, healthcheck.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod admin;
pub mod amount;
pub mod body;
pub mod cli;
pub mod config;
pub mod cookie_memo;
pub mod demo;
pub mod flow;
pub mod forward_auth;
pub mod gateway;
pub mod logfmt;
pub mod merchant;
pub mod metrics;
pub mod origin_h1;
pub mod origin_pool;
pub mod pages;
pub mod path;
pub mod payment;
pub mod policy;
pub mod proxy;
pub mod sandbox;
pub mod server;
pub mod session;
pub mod tls;
