<?php
// The HTTP API from PHP, with nothing but the curl extension (php-fpm, a Laravel job, a cron script).
//   FANOUT_API_URL=http://127.0.0.1:8765 FANOUT_API_KEY=... php examples/http/push.php

function fanout(string $call, array $args = [])
{
    $api = getenv('FANOUT_API_URL') ?: 'http://127.0.0.1:8765';
    $curl = curl_init("$api/api/$call");
    curl_setopt_array($curl, [
        CURLOPT_POST => true,
        CURLOPT_POSTFIELDS => json_encode((object) $args),
        CURLOPT_HTTPHEADER => [
            'Authorization: Bearer ' . getenv('FANOUT_API_KEY'),
            'Content-Type: application/json',
        ],
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT => 10,
    ]);
    $body = curl_exec($curl);
    $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
    curl_close($curl);
    $answer = json_decode((string) $body, true);
    if ($status !== 200) {
        throw new RuntimeException("fanout $call: HTTP $status: " . ($answer['error']['message'] ?? $body));
    }
    return $answer['result'];
}

// GatewayClient::sendToGroup('lobby', ...) becomes:
fanout('send_to_group', ['groups' => 'lobby', 'data' => ['text' => 'hello from PHP']]);
// and GatewayClient::getClientIdCountByGroup('lobby'):
echo fanout('get_group_count', ['group' => 'lobby']), "\n";
