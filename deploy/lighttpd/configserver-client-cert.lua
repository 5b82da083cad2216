-- configserver: hand the verified device certificate to the app (lighttpd 1.4.60+, mod_magnet).
--
-- lighttpd's mod_proxy forwards no TLS facts and mod_setenv cannot copy them, so this script,
-- run by "magnet.attract-raw-url-to" before mod_proxy, writes them as request headers. It needs
-- ssl.verifyclient.activate, .enforce and .exportcert enabled (deploy/lighttpd/50-configserver.conf).
--
-- Every name the app reads is first removed, so nothing the client sent under it survives,
-- whatever its letter case (lighttpd merges such duplicates into one header, removed here).
-- lighttpd has no issuer DN: the app takes the issuer from the certificate.
-- The proxy secret is no business of this script: www-data can read it, so 50-configserver.conf
-- sets that header (mod_setenv, after this script has run). Never add it to the list below.

local r = lighty.r
local env, hdr = r.req_env, r.req_header

for _, name in ipairs({
    "X-SSL-Client-Verify", "X-SSL-Client-S-DN", "X-SSL-Client-I-DN", "X-SSL-Client-S-DN-CN",
    "X-SSL-Client-Cert", "X-SSL-Client-Serial", "X-Forwarded-For", "Forwarded", "X-Real-IP",
}) do
    hdr[name] = nil
end

hdr["X-SSL-Client-Verify"] = env["SSL_CLIENT_VERIFY"] or "NONE"
-- OpenSSL's one-line form: "C = DE, O = innovaphone, CN = IP232-30-00-af"
local subject = env["SSL_CLIENT_S_DN"]
if subject then hdr["X-SSL-Client-S-DN"] = subject end
local cn = env["SSL_CLIENT_S_DN_CN"]
if cn then hdr["X-SSL-Client-S-DN-CN"] = cn end
local serial = env["SSL_CLIENT_M_SERIAL"]
if serial then hdr["X-SSL-Client-Serial"] = serial end
-- URL-encoded, never raw: the PEM's line breaks would end the header early and corrupt the request.
local pem = env["SSL_CLIENT_CERT"]
if pem then hdr["X-SSL-Client-Cert"] = lighty.c.urlenc(pem) end

-- The device's address. mod_proxy appends the peer to X-Forwarded-For; with the client's value
-- removed above, the header holds that one address only.
hdr["X-Real-IP"] = r.req_attr["request.remote-addr"]
return 0
